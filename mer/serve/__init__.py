"""`mer-pipeline serve`: an OpenAI-compatible HTTP server over the process graph (docs/serving.md).

The server runs in the supervisor's process and event loop (uvicorn on uvloop): `server.py` starts
the graph with the serving job and the HTTP app side by side; `app.py` holds the routes;
`openai_requests.py` checks request bodies; `hub.py` bridges requests and the router's reports;
`text_stream.py` turns tokens into text with stop strings; `chat_prompt.py` renders chats;
`metrics.py` is `/metrics`.
"""
