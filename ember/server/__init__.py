"""ember serve: the OpenAI-compatible HTTP server, the sessions API and the web page."""
