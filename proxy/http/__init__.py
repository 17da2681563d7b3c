"""Our own HTTP/1.1 layer (asyncio protocols + httptools): the server clients talk to,
the client that talks to the API, and header framing shared by both."""
