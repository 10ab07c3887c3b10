"""``neoxja serve``: OpenAI's HTTP API over a continuous-batching engine (see the README's "Serving")."""
