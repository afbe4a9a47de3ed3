"""The applications that wire the queue to the engine: the HTTP API (api, served by
`backend/server.py`), the worker process (worker), the command line (cli, data_cli),
the MCP server (mcp_server) and its HTTP client (client). A new endpoint goes in
`api/`. Applications may import every layer; nothing imports them."""
