"""Settings of the item index (``reolm embed items``) and of the service (``reolm serve``).

Both are ordinary sections of the one config system (:mod:`reolm.config`): defaults here,
then ``--config`` YAML files, then ``key=value`` overrides; the command-line flags of the two
commands are shorthands for the most used keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from reolm.config import ConfigError, param
from reolm.precision import PRECISION_DOC, PRECISIONS

__all__ = ["IndexConfig", "ServeConfig", "EmbedConfig", "INDEX_KINDS"]

INDEX_KINDS = ("flat", "hnsw", "ivf")


@dataclass(frozen=True)
class IndexConfig:
    """Which FAISS index holds the item vectors (inner product of L2-normalised vectors = cosine)."""

    kind: str = param("flat", "flat = exact inner-product search (IndexFlatIP); hnsw = graph-based approximate "
                              "search (IndexHNSWFlat); ivf = inverted lists over k-means cells (IndexIVFFlat).",
                      choices=INDEX_KINDS)
    hnsw_m: int = param(32, "HNSW: neighbours per node (more = better recall, more memory and build time).", ge=2)
    hnsw_ef_construction: int = param(40, "HNSW: candidate list size while building the graph.", ge=1)
    hnsw_ef_search: int = param(64, "HNSW: candidate list size per query (recall/latency trade-off; the "
                                    "service can override it).", ge=1)
    ivf_lists: int = param(0, "IVF: number of k-means cells; 0 = 4 x sqrt(items), at least 1 and at most "
                              "items / 39 (FAISS wants 39 training points per cell).", ge=0)
    ivf_nprobe: int = param(16, "IVF: cells visited per query (recall/latency trade-off; the service can "
                                "override it).", ge=1)
    train_sample: int = param(262144, "IVF: at most this many vectors train the k-means quantizer.", ge=1)
    seed: int = param(0, "Seed of the IVF training sample and k-means.")


@dataclass(frozen=True)
class EmbedConfig:
    """``reolm embed items``: encode every item of a domain and index the vectors."""

    index: IndexConfig = field(default_factory=IndexConfig)
    device: str = param("auto", "Where the model runs: auto (CUDA when available), cpu, cuda, cuda:N.")
    precision: str = param("auto", PRECISION_DOC, choices=PRECISIONS)
    batch_size: int = param(256, "Items encoded per forward pass.", ge=1)
    progress: bool = param(True, "Show a progress bar while encoding.")


@dataclass(frozen=True)
class ServeConfig:
    """``reolm serve``: the HTTP service and its limits."""

    host: str = param("127.0.0.1", "Address to bind. The default is loopback only; bind another address "
                                   "only behind your own authentication (the service has none).")
    port: int = param(8000, "TCP port to listen on.", ge=0, le=65535)
    device: str = param("auto", "Where the model runs: auto (CUDA when available), cpu, cuda, cuda:N.")
    precision: str = param("auto", PRECISION_DOC, choices=PRECISIONS)
    max_k: int = param(1000, "Largest k a /recommend request may ask for.", ge=1)
    max_history: int = param(200, "Most history entries one /recommend request may send (the model still "
                                  "reads only its own last reolm.eval_max_history_items of them).", ge=1)
    max_items_per_request: int = param(1024, "Most items one POST /items request may add.", ge=1)
    max_body_bytes: int = param(4 * 1024 * 1024, "Largest request body accepted (413 above it).", ge=1024)
    max_attribute_chars: int = param(4096, "Longest attribute value (characters) of an item given by content "
                                           "(422 above it). The model reads only its first max_attr_tokens "
                                           "tokens; the limit bounds the tokenizer's work per value.", ge=1)
    max_item_chars: int = param(16384, "Most characters of all attribute values of one item (422 above it).", ge=1)
    heavy_request_chars: int = param(65536, "Requests whose items carry more text than this are tokenised one "
                                            "at a time, so a few huge requests cannot take every core from the "
                                            "rest.", ge=1)
    header_timeout_s: float = param(10.0, "A client must send a request's headers within this many seconds of "
                                          "its first byte (the connection is closed otherwise).", gt=0)
    body_timeout_s: float = param(20.0, "A request body must arrive completely within this many seconds of "
                                        "its headers (408 and the connection closed otherwise).", gt=0)
    torch_threads: int = param(0, "Intra-op threads of the model on CPU; 0 = half the cores (at least 1): the "
                                  "HTTP event loop needs a core of its own, and OpenMP threads that spin on "
                                  "a busy core slow every request.", ge=0)
    batch_wait_ms: float = param(2.0, "After the first queued request, wait this long for more to join the same "
                                      "forward pass (0 = take only what is already queued).", ge=0)
    max_batch_items: int = param(512, "Most items (history entries to encode and new items) one forward pass "
                                      "takes; larger queues are split into several passes.", ge=1)
    item_batch_size: int = param(256, "Items per forward pass when encoding new items.", ge=1)
    hnsw_ef_search: int = param(0, "HNSW candidate list size per query; 0 = the value the index was built "
                                   "with.", ge=0)
    ivf_nprobe: int = param(0, "IVF cells visited per query; 0 = the value the index was built with.", ge=0)
    save_on_shutdown: bool = param(True, "On SIGTERM/SIGINT, after the in-flight requests finish, save items "
                                         "added or deleted since the last save back into the index folder.")
    graceful_timeout_s: float = param(30.0, "On shutdown, wait at most this long for in-flight requests (a batch "
                                            "the worker is running is always finished and answered).", gt=0)
    latency_window: int = param(10000, "GET /metrics percentiles cover the last this many requests per "
                                       "endpoint.", ge=10)
    log_level: str = param("info", "Server log level.", choices=("critical", "error", "warning", "info", "debug"))

    def check(self) -> None:
        if self.max_batch_items < self.max_history:
            raise ConfigError(f"max_batch_items={self.max_batch_items} must be >= max_history={self.max_history} "
                              f"(one request's history must fit one forward pass)")
