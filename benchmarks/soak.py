"""Reliability soak of ``vroll serve``: a hostile and careless client, bounded in time.

Starts its own server on loopback (DP as asked) and runs, in this order:

1. ``seeds``: the reproductions of issue 11 item 1 (seed 2^64, 2^63-1 with two prompts):
   each must answer below 500 within a second or so, and the next request must work;
2. ``malformed``: a corpus of 100+ malformed requests (bad JSON, wrong types, out of range
   numbers, lone surrogates, unknown fields and routes): counts of clean 4xx, accepted,
   5xx, non-JSON errors and hangs; then one normal request must work;
3. ``batching``: 32 concurrent one-prompt requests vs one 32-prompt request (goal: <= 1.5x);
4. ``concurrency``: N clients for T seconds: ok/4xx/5xx/hang counts, latency, memory;
5. ``disconnects``: clients that give up mid-request; the engine must stop their work
   (replica CPU drops) and the next request must be fast;
6. ``flood``: one client asks for ~65K tokens at once while another sends small requests: their
   latency (fair scheduling bounds it; ``--server-flags '--fair-scheduling false'`` shows first come);
7. ``replica_kill``: ``kill -9`` a replica: 503 with a reason meanwhile, then served again;
8. ``shutdown``: SIGTERM during generates: waiting clients get a JSON 503, exit < 5 s.

Prints one table and writes JSON (``--out``). ``--short`` is the form
``tests/server/test_reliability.py`` runs.

    python benchmarks/soak.py                   # 32 clients x 120 s
    python benchmarks/soak.py --short           # ~2 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil
from _common import default_out, machine_info, print_table, write_json

from vroll.launch import ServerProcess, launch_server

NAME = "soak"
HANG_S = 60.0  # a request without an answer after this long counts as a hang
BATCH_GOAL = 1.5


# ------------------------------------------------------------------ requests


def call(url: str, method: str, path: str, body: bytes | None = None, timeout: float = HANG_S) -> dict[str, Any]:
    """One request on a fresh connection: status (0 = hang, -1 = connection error), JSON-ness, seconds."""
    t0 = time.perf_counter()
    try:
        with httpx.Client(timeout=timeout) as c:
            r = c.request(method, url + path, content=body, headers={"content-type": "application/json"})
        try:
            parsed = r.json()
            is_json = isinstance(parsed, dict)
            error = parsed.get("error") if is_json else None
        except ValueError:
            is_json, error = False, r.text[:200]
        return {"status": r.status_code, "json": is_json, "error": error, "s": time.perf_counter() - t0}
    except httpx.TimeoutException:
        return {"status": 0, "json": False, "error": "timeout", "s": time.perf_counter() - t0}
    except httpx.TransportError as exc:
        return {"status": -1, "json": False, "error": str(exc), "s": time.perf_counter() - t0}


def gen(url: str, timeout: float = HANG_S, **fields: Any) -> dict[str, Any]:
    body = {"prompts": ["Hello"], "max_tokens": 4, **fields}
    return call(url, "POST", "/generate", json.dumps(body).encode(), timeout)


def classify(results: list[dict[str, Any]]) -> dict[str, int]:
    c = Counter("ok" if 200 <= r["status"] < 300 else "4xx" if 400 <= r["status"] < 500
                else "5xx" if r["status"] >= 500 else "hang" if r["status"] == 0 else "conn_error"
                for r in results)
    return {k: c.get(k, 0) for k in ("ok", "4xx", "5xx", "hang", "conn_error")}


# ------------------------------------------------------------------ the corpus


def _raw(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


# (field, raw JSON value) sent on /generate and on /chat
SAMPLING_CASES: list[tuple[str, str]] = [
    ("seed", "18446744073709551616"), ("seed", str(2**70)), ("seed", "-1"), ("seed", "1.5"),
    ("seed", '"3"'), ("seed", "true"), ("seed", str(-(2**63))),
    ("n", "0"), ("n", "-1"), ("n", '"3"'), ("n", "true"), ("n", "1.5"), ("n", "1000000"), ("n", str(2**70)),
    ("max_tokens", "0"), ("max_tokens", "-1"), ("max_tokens", str(2**70)), ("max_tokens", '"5"'),
    ("max_tokens", "1e9"), ("max_tokens", "null"),
    ("temperature", "-1"), ("temperature", "Infinity"), ("temperature", "1e308"), ("temperature", "NaN"),
    ("temperature", '"hot"'),
    ("top_p", "0"), ("top_p", "-0.1"), ("top_p", "1.5"), ("top_p", "NaN"),
    ("top_k", "-2"), ("top_k", "1.5"), ("top_k", str(10**12)),
    ("min_p", "-1"), ("min_p", "2"),
    ("repetition_penalty", "0"), ("repetition_penalty", "-1"), ("repetition_penalty", "Infinity"),
    ("repetition_penalty", "1e308"),
    ("stop", '[""]'), ("stop", '"x"'), ("stop", "[1]"), ("stop", "[null]"), ("stop", json.dumps(["a"] * 1000)),
    ("ignore_eos", '"yes"'), ("ignore_eos", "1"), ("ignore_eos", "null"),
    ("unknown_field", "1"),
]


def malformed_corpus() -> list[tuple[str, str, str, bytes]]:
    """(name, method, path, body) of 100+ requests a careless or hostile client sends."""
    cases: list[tuple[str, str, str, bytes]] = []
    for name, body in [("not json", b"{prompts"), ("empty body", b""), ("json array", b"[1,2]"),
                       ("json null", b"null"), ("json string", b'"Hello"'), ("deep nesting", b"[" * 5000),
                       ("binary", bytes(range(256))), ("utf-16", '{"prompts":["a"]}'.encode("utf-16"))]:
        cases.append((name, "POST", "/generate", body))
    prompts: list[tuple[str, Any]] = [
        ("prompts missing", None), ("prompts empty", []), ("prompts not a list", "Hello"),
        ("prompt empty string", [""]), ("prompt int", [123]), ("prompt mixed", ["a", [1, 2]]),
        ("prompt ids empty", [[]]), ("prompt id negative", [[-1]]), ("prompt id huge", [[10**9]]),
        ("prompt id 2^70", [[2**70]]), ("prompt id str", [["a"]]), ("prompt null", [None]),
        ("prompt float ids", [[1.5]]), ("prompt too long", [[1] * 600]), ("prompt nested", [[[1]]]),
        ("many prompts", ["x"] * 1000),
    ]
    for name, p in prompts:
        body = {"max_tokens": 2} if p is None else {"prompts": p, "max_tokens": 2}
        cases.append((name, "POST", "/generate", json.dumps(body).encode()))
    cases.append(("lone surrogate", "POST", "/generate", _raw('{"prompts":["a\\ud800b"],"max_tokens":2}')))
    cases.append(("raw surrogate bytes", "POST", "/generate", b'{"prompts":["a\xed\xa0\x80b"],"max_tokens":2}'))
    for field, value in SAMPLING_CASES:
        cases.append((f"generate {field}={value[:20]}", "POST", "/generate",
                      _raw(f'{{"prompts":["Hello","Hi"],"max_tokens":2,"{field}":{value}}}')))
        cases.append((f"chat {field}={value[:20]}", "POST", "/chat",
                      _raw(f'{{"messages":[[{{"role":"user","content":"Hi"}}]],"max_tokens":2,"{field}":{value}}}')))
    for name, msgs in [("chat messages missing", None), ("chat empty conv", [[]]), ("chat no list", "hi"),
                       ("chat bad role", [[{"role": "wizard", "content": "x"}]]),
                       ("chat content int", [[{"role": "user", "content": 5}]]),
                       ("chat role missing", [[{"content": "x"}]]),
                       ("chat assistant first", [[{"role": "assistant", "content": "x"}]])]:
        body = {"max_tokens": 2} if msgs is None else {"messages": msgs, "max_tokens": 2}
        cases.append((name, "POST", "/chat", json.dumps(body).encode()))
    for name, method, path, body in [
        ("GET /generate", "GET", "/generate", b""), ("POST /nope", "POST", "/nope", b"{}"),
        ("PUT /health", "PUT", "/health", b""), ("weights close no session", "POST", "/weights/close", b"{}"),
        ("weights update no session", "POST", "/weights/update", b'{"buckets":[]}'),
        ("weights status unknown", "GET", "/weights/update/999", b""),
        ("weights status not int", "GET", "/weights/update/abc", b""),
        ("weights init nccl on cpu", "POST", "/weights/init",
         b'{"host":"127.0.0.1","port":1,"world_size":2,"backend":"nccl"}'),
        ("weights init port 0", "POST", "/weights/init", b'{"host":"127.0.0.1","port":0,"backend":"gloo"}'),
        ("weights init port 70000", "POST", "/weights/init", b'{"host":"127.0.0.1","port":70000}'),
        ("weights init timeout -1", "POST", "/weights/init", b'{"host":"127.0.0.1","port":1,"timeout_s":-1}'),
        ("weights init garbage", "POST", "/weights/init", b'{"host":5}'),
    ]:
        cases.append((name, method, path, body))
    return cases


# ------------------------------------------------------------------ processes


def replica_processes(server: ServerProcess) -> list[psutil.Process]:
    """The server's replica processes (spawned children), each leading its engine core."""
    kids = psutil.Process(server.process.pid).children(recursive=False)
    return [k for k in kids if "spawn_main" in " ".join(k.cmdline())]


def tree_rss_mb(pid: int) -> float:
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def replicas_cpu_percent(server: ServerProcess, seconds: float = 1.0) -> float:
    """CPU use (percent of one core) of every replica and engine core, over ``seconds``."""
    procs = [q for p in replica_processes(server) for q in (p, *p.children(recursive=True))]
    for p in procs:
        p.cpu_percent(None)
    time.sleep(seconds)
    total = 0.0
    for p in procs:
        try:
            total += p.cpu_percent(None)
        except psutil.NoSuchProcess:
            pass
    return round(total, 1)


def wait_until(predicate: Callable[[], bool], timeout_s: float, poll_s: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll_s)
    return False


# ------------------------------------------------------------------ phases


def phase_seeds(url: str) -> dict[str, Any]:
    cases = {"seed 2^64": {"seed": 2**64}, "seed 2^63-1, two prompts": {"seed": 2**63 - 1, "prompts": ["a", "b"]}}
    out: dict[str, Any] = {}
    gen(url)  # warm up: the first request of a fresh engine is slow
    for name, fields in cases.items():
        r = gen(url, **{"max_tokens": 2, **fields})
        after = gen(url, max_tokens=2, seed=1)
        out[name] = {"status": r["status"], "s": round(r["s"], 2), "next_status": after["status"],
                     "next_s": round(after["s"], 2)}
    return out


def phase_malformed(url: str, server: ServerProcess) -> dict[str, Any]:
    results = []
    for name, method, path, body in malformed_corpus():
        r = call(url, method, path, body)
        results.append({"case": name, **{k: r[k] for k in ("status", "json", "s")}, "error": str(r["error"])[:160]})
    counts = classify(results)
    after = gen(url)
    return {"cases": len(results), **counts,
            "errors_not_json": sum(1 for r in results if r["status"] >= 400 and not r["json"]),
            "server_alive": server.process.poll() is None, "next_status": after["status"],
            "max_s": round(max(r["s"] for r in results), 2),
            "non_4xx": [r for r in results if not 400 <= r["status"] < 500]}


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def phase_batching(url: str, prompts: int = 32, max_tokens: int = 32) -> dict[str, Any]:
    fields = {"max_tokens": max_tokens, "ignore_eos": True, "seed": 7}
    gen(url, prompts=["warm up"] * 4, **fields)
    t0 = time.perf_counter()
    one = gen(url, timeout=300, prompts=[f"Story {i}:" for i in range(prompts)], **fields)
    one_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with ThreadPoolExecutor(prompts) as ex:
        many = list(ex.map(lambda i: gen(url, timeout=300, prompts=[f"Story {i}:"], **fields), range(prompts)))
    many_s = time.perf_counter() - t0
    # What serving them one after another would cost: one single-prompt request, times `prompts`.
    single_s = min(_timed(lambda: gen(url, timeout=300, prompts=["Story 0:"], **fields)) for _ in range(2))
    return {"prompts": prompts, "max_tokens": max_tokens, "one_request_s": round(one_s, 2),
            "concurrent_s": round(many_s, 2), "ratio": round(many_s / one_s, 2), "goal": BATCH_GOAL,
            "serial_estimate_s": round(prompts * single_s, 2),
            "vs_serial": round(many_s / (prompts * single_s), 3),
            "all_ok": one["status"] == 200 and all(r["status"] == 200 for r in many)}


def phase_concurrency(url: str, server: ServerProcess, clients: int, seconds: float) -> dict[str, Any]:
    rss_before = tree_rss_mb(server.process.pid)
    deadline = time.monotonic() + seconds
    results: list[dict[str, Any]] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        rng = random.Random(i)
        while time.monotonic() < deadline:
            r = gen(url, prompts=[f"Client {i} says" for _ in range(rng.randint(1, 4))],
                    max_tokens=rng.randint(4, 24), n=rng.randint(1, 2), seed=rng.randint(0, 2**31))
            with lock:
                results.append(r)

    with ThreadPoolExecutor(clients) as ex:
        list(ex.map(client, range(clients)))
    lat = sorted(r["s"] for r in results if r["status"] == 200) or [0.0]
    return {"clients": clients, "seconds": seconds, "requests": len(results), **classify(results),
            "latency_p50_s": round(statistics.median(lat), 2),
            "latency_p95_s": round(lat[int(0.95 * (len(lat) - 1))], 2), "latency_max_s": round(lat[-1], 2),
            "rss_mb_before": round(rss_before), "rss_mb_after": round(tree_rss_mb(server.process.pid))}


def phase_disconnects(url: str, server: ServerProcess, clients: int) -> dict[str, Any]:
    long = {"prompts": ["Once upon a time"] * 4, "max_tokens": 400, "ignore_eos": True}
    with ThreadPoolExecutor(clients) as ex:
        futures = [ex.submit(gen, url, 2.0, **long) for _ in range(clients)]
        time.sleep(1.0)
        cpu_during = replicas_cpu_percent(server)
        gave_up = sum(1 for f in futures if f.result()["status"] == 0)
    time.sleep(2.0)  # the server polls for disconnects every half second
    cpu_after = replicas_cpu_percent(server, 2.0)
    after = gen(url)
    return {"clients": clients, "gave_up": gave_up, "replica_cpu_pct_during": cpu_during,
            "replica_cpu_pct_after": cpu_after, "next_status": after["status"], "next_s": round(after["s"], 2)}


def phase_flood(url: str, prompts: int, max_tokens: int, small_every_s: float = 0.5) -> dict[str, Any]:
    """One client floods (``prompts`` x n 4 x ``max_tokens``, ignore_eos); another sends a one-prompt,
    8-token request every ``small_every_s`` meanwhile: its latency is what fair scheduling bounds."""
    flood_body = {"prompts": [f"Flood {i}:" for i in range(prompts)], "n": 4, "max_tokens": max_tokens,
                  "ignore_eos": True, "seed": 1}
    small: list[dict[str, Any]] = []
    with ThreadPoolExecutor(1) as ex:
        t0 = time.perf_counter()
        flood = ex.submit(gen, url, 600.0, **flood_body)
        time.sleep(1.0)  # the flood's sequences are queued in the engine
        while not flood.done():
            small.append(gen(url, 120.0, prompts=["Hi"], max_tokens=8, ignore_eos=True))
            time.sleep(small_every_s)
        flood_s = time.perf_counter() - t0
        big = flood.result()
    latencies = sorted(r["s"] for r in small if r["status"] == 200)
    return {"flood_tokens": prompts * 4 * max_tokens, "flood_s": round(flood_s, 1), "flood_status": big["status"],
            "small_requests": len(small), "small_ok": len(latencies),
            "small_p50_s": round(statistics.median(latencies), 2) if latencies else None,
            "small_max_s": round(latencies[-1], 2) if latencies else None}


def phase_replica_kill(url: str, server: ServerProcess, restart_timeout_s: float) -> dict[str, Any]:
    victim = replica_processes(server)[0]
    engine_core = victim.children(recursive=True)
    t0 = time.monotonic()
    victim.kill()
    health: dict[str, Any] = {}

    def reported() -> bool:
        nonlocal health
        r = httpx.get(url + "/health", timeout=5)
        health = {"status": r.status_code, **r.json()}
        return r.status_code == 503

    seen_503 = wait_until(reported, 30, 0.1)
    detected_s = time.monotonic() - t0
    during = gen(url)
    _, alive = psutil.wait_procs(engine_core, timeout=10)
    back = wait_until(lambda: httpx.get(url + "/health", timeout=5).status_code == 200, restart_timeout_s, 1.0)
    restart_s = time.monotonic() - t0
    after = gen(url)
    final = httpx.get(url + "/health", timeout=5).json()
    return {"reported_503": seen_503, "detected_s": round(detected_s, 2), "health_during": health,
            "generate_during": {"status": during["status"], "error": during["error"]},
            "engine_core_left": [p.pid for p in alive], "restarted": back, "restart_s": round(restart_s, 1),
            "next_status": after["status"], "health_after": final}


def _connections(server: ServerProcess, url: str) -> int:
    """Established TCP connections to the server's port, as the server process sees them."""
    port = int(url.rsplit(":", 1)[1])
    conns = psutil.Process(server.process.pid).net_connections(kind="tcp")
    return sum(1 for c in conns if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == port)


def phase_shutdown(url: str, server: ServerProcess, clients: int = 4) -> dict[str, Any]:
    long = {"prompts": ["Once upon a time"] * 2, "max_tokens": 400, "ignore_eos": True}
    everyone = [psutil.Process(server.process.pid), *psutil.Process(server.process.pid).children(recursive=True)]
    with ThreadPoolExecutor(clients) as ex:
        futures = [ex.submit(gen, url, 30.0, **long) for _ in range(clients)]
        # Every client must be inside the server before the signal: one that connects after it
        # is refused (right, but not what this phase measures). A fixed sleep lost that race on
        # a loaded CI machine.
        arrived = wait_until(lambda: _connections(server, url) >= clients, 30, 0.1)
        time.sleep(1.0)
        t0 = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        results = [f.result() for f in futures]
        try:
            server.process.wait(30)
        except Exception:  # noqa: BLE001 - recorded as a slow exit below
            pass
        exit_s = time.monotonic() - t0
    _, alive = psutil.wait_procs(everyone, timeout=10)
    return {"clients": clients, "arrived": arrived, "statuses": [r["status"] for r in results],
            "json_503": sum(1 for r in results if r["status"] == 503 and r["json"]),
            "errors": sorted({str(r["error"]) for r in results}), "exit_s": round(exit_s, 2),
            "exit_code": server.process.returncode, "left_alive": [p.pid for p in alive]}


# ------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--clients", type=int, default=32, help="concurrent clients in the concurrency phase")
    p.add_argument("--seconds", type=float, default=120.0, help="length of the concurrency phase")
    p.add_argument("--disconnects", type=int, default=10, help="clients that give up mid-request")
    p.add_argument("--dp", type=int, default=1, help="--data-parallel-size of the server")
    p.add_argument("--restart-timeout", type=float, default=600.0, help="seconds a killed replica may take back")
    p.add_argument("--short", action="store_true", help="8 clients x 10 s, 6 disconnects (the test's form)")
    p.add_argument("--flood-prompts", type=int, default=256, help="prompts (x n 4) of the flood phase's request")
    p.add_argument("--flood-tokens", type=int, default=64, help="max_tokens of the flood phase's request")
    p.add_argument("--only", choices=["flood"], default=None, help="run only this phase")
    p.add_argument("--model", default=None, help="the server's model (default: the embedded one)")
    p.add_argument("--server-flags", default="", help="more `vroll serve` flags, e.g. '--fair-scheduling false'")
    p.add_argument("--out", default=None, help="JSON output (default: benchmarks/results/soak-<time>.json)")
    args = p.parse_args(argv)
    if args.short:
        args.clients, args.seconds, args.disconnects = 8, 10.0, 6
        args.flood_prompts = 0  # no flood: tests/server/test_fairness.py floods the shared tiny-model server
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    log = Path(tempfile.mkdtemp(prefix="vroll-soak-")) / "serve.log"
    flags = ["--enforce-eager", "--max-model-len", "512", "--kv-cache-memory-gib", "0.5",
             "--data-parallel-size", str(args.dp), *(["--model", args.model] if args.model else []),
             *args.server_flags.split()]
    server = launch_server(flags, log)
    url, record = server.url, {"dp": args.dp, "server_log": str(log), "server_flags": flags}
    if args.only == "flood":
        try:
            record["flood"] = phase_flood(url, args.flood_prompts, args.flood_tokens)
        finally:
            server.stop()
        return record
    try:
        record["seeds"] = phase_seeds(url)
        record["malformed"] = phase_malformed(url, server)
        record["batching"] = phase_batching(url)
        record["concurrency"] = phase_concurrency(url, server, args.clients, args.seconds)
        record["disconnects"] = phase_disconnects(url, server, args.disconnects)
        if args.flood_prompts:
            record["flood"] = phase_flood(url, args.flood_prompts, args.flood_tokens)
        record["replica_kill"] = phase_replica_kill(url, server, args.restart_timeout)
        record["shutdown"] = phase_shutdown(url, server)
    finally:
        server.stop()
    return record


def report(r: dict[str, Any]) -> None:
    if "seeds" not in r:
        f = r["flood"]
        print_table(["phase", "result"], [["flood", _flood_line(f)]], title="vroll serve soak (flood only)")
        return
    m, c, b, d, k, s = (r[x] for x in ("malformed", "concurrency", "batching", "disconnects", "replica_kill",
                                        "shutdown"))
    rows = [
        ["seed reproductions", "; ".join(f"{n}: {v['status']} in {v['s']} s, next {v['next_status']}"
                                         for n, v in r["seeds"].items())],
        ["malformed requests", f"{m['cases']} cases: {m['4xx']} clean 4xx, {m['ok']} accepted, {m['5xx']} 5xx, "
                               f"{m['hang']} hang, {m['errors_not_json']} non-JSON errors, "
                               f"server alive {m['server_alive']}, next {m['next_status']}"],
        ["batching", f"32 concurrent one-prompt {b['concurrent_s']} s vs one 32-prompt {b['one_request_s']} s: "
                     f"{b['ratio']}x (goal <= {b['goal']}x); {b['vs_serial']}x of one-by-one"],
        ["concurrency", f"{c['clients']} clients x {c['seconds']:.0f} s: {c['ok']} ok, {c['4xx']} 4xx, "
                        f"{c['5xx']} 5xx, {c['hang']} hang; latency p50 {c['latency_p50_s']} s, p95 "
                        f"{c['latency_p95_s']} s; memory {c['rss_mb_before']} -> {c['rss_mb_after']} MB"],
        ["disconnects", f"{d['gave_up']} of {d['clients']} gave up; replica CPU {d['replica_cpu_pct_during']}% -> "
                        f"{d['replica_cpu_pct_after']}%; next request {d['next_status']} in {d['next_s']} s"],
        ["flood vs small", _flood_line(r["flood"]) if "flood" in r else "not run"],
        ["replica kill -9", f"503 reported {k['reported_503']} after {k['detected_s']} s "
                            f"({k['generate_during']['error']}); restarted {k['restarted']} after "
                            f"{k['restart_s']} s; next {k['next_status']}"],
        ["SIGTERM under load", f"{s['json_503']} of {s['clients']} waiting clients got JSON 503; exit in "
                               f"{s['exit_s']} s (code {s['exit_code']}); left alive {s['left_alive']}"],
    ]
    print_table(["phase", "result"], rows, title=f"vroll serve soak (DP={r['dp']})")


def _flood_line(f: dict[str, Any]) -> str:
    return (f"a {f['flood_tokens']:,}-token request took {f['flood_s']} s ({f['flood_status']}); meanwhile "
            f"{f['small_ok']} of {f['small_requests']} small requests ok, latency p50 {f['small_p50_s']} s, "
            f"max {f['small_max_s']} s")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    record = run(args)
    report(record)
    out = write_json(args.out or default_out(NAME), {"machine": machine_info(), "args": vars(args), **record})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
