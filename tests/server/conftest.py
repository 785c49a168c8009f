import pytest

from .fixtures import API_KEY, ServerProcess, build_checkpoint

MAX_MODEL_LEN = 512
MAX_BODY = 64 * 1024
KV_PAGES = 160  # 2560 tokens for 16 sequences of up to 512: the soak runs into preemption and prefix eviction


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    return build_checkpoint(str(tmp_path_factory.mktemp("served") / "tiny-bpe"))


@pytest.fixture(scope="session")
def servers(checkpoint, tmp_path_factory):
    """Both servers start together (startup is mostly imports): the main one with an API key, and a 'busy' one
    that runs one request at a time and queues at most one, for the 503 test. Both are always ended."""
    logs = tmp_path_factory.mktemp("logs")
    procs = []
    try:
        procs.append(ServerProcess(checkpoint, str(logs / "main.log"), "--served-model-name", "tiny",
                                   "--max-model-len", str(MAX_MODEL_LEN), "--page-size", "16",
                                   "--max-num-seqs", "16", "--num-kv-blocks", str(KV_PAGES),
                                   "--max-body-bytes", str(MAX_BODY), api_key=API_KEY))
        procs.append(ServerProcess(checkpoint, str(logs / "busy.log"), "--served-model-name", "tiny",
                                   "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "1",
                                   "--max-waiting-requests", "1"))
        for p in procs:
            p.wait_ready()
        yield {"main": procs[0], "busy": procs[1]}
    finally:
        for p in procs:
            p.stop()


@pytest.fixture(scope="session")
def server(servers):
    return servers["main"]


@pytest.fixture
def client(server):
    from openai import OpenAI

    with OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60) as c:
        yield c
