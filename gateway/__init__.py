"""The tool-calling gateway: the orchestration tier of the ECS guide's "two-tier architecture" (Lab 9).

Clients send OpenAI chat requests here (CPU); the gateway calls the vLLM server (GPU) with the caller's
tenant's tools, executes the tool calls itself, feeds the results back and returns the final answer. So
the GPU never waits on a webhook, tool credentials and tenant data never reach the inference tier, and
tools change without redeploying the model.

    settings.py       the service's settings (upstream, tenants source, limits), from a file and the environment
    aws.py            boto3 clients (Secrets Manager, S3): plain boto3, which honours AWS_ENDPOINT_URL itself
    toolset.py        a tool set as data: names, JSON schemas, webhook / Python implementations, checked at load
    builtin_tools.py  real built-in tools: a safe calculator, a clock, an allow-listed HTTP fetch
    executor.py       running one tool call: argument checks, timeouts, outcomes
    loop.py           the server-side tool loop against an OpenAI-compatible upstream (vLLM)
    tenants.py        API keys -> tenant (tool set, served model), compared in constant time
    metrics.py        the Prometheus metrics
    app.py            the FastAPI app: /v1/chat/completions, /v1/tools, /health, /metrics
    __main__.py       `python -m gateway`: the app under uvicorn

The gateway is its own image: it imports nothing of the pipeline (tasks/, flows/, blocks/, embedded/,
prefect); tests/test_architecture.py checks that.
"""
