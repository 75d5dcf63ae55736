"""The `rolloutd` command. `rolloutd --help` lists the subcommands, `rolloutd up --help` each one's options."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import socket
import sys

from . import config

DESCRIPTION = """\
rolloutd: the generation half of an RL training loop, as a daemon. A broker fans generate / abort
requests from trainers out to one vLLM worker per GPU over ZeroMQ.

  rolloutd up --model tiny --workers 2        broker + 2 local workers, in the foreground
  rolloutd generate --prompt "Hello"          ask the running daemon
  rolloutd status                             its workers
  rolloutd models prepare smollm2             build a built-in model (smollm2, tiny) into the cache
  rolloutd bench                              in-process vLLM vs rolloutd vs Ray, same engines, same run
"""


def _engine_args(p: argparse.ArgumentParser) -> list:
    """The vLLM engine's options (each one declared here only); returns them, for `up` to pass on."""
    g = p.add_argument_group("engine (vLLM)")
    return [
        g.add_argument("--model", default="smollm2",
                       help="HF model folder, or a built-in name prepared on first use: smollm2, tiny (default: smollm2)"),
        g.add_argument("--tensor-parallel-size", "--tp", type=int, default=1, help="GPUs per worker (default 1)"),
        g.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)"),
        g.add_argument("--max-num-seqs", type=int, default=None, help="sequences per engine step (default: vLLM's)"),
        g.add_argument("--gpu-memory-utilization", type=float, default=None,
                       help="share of GPU memory (default: vLLM's)"),
        g.add_argument("--kv-cache-gb", type=float, default=None, help="KV cache size in GiB (default: 1 on CPU)"),
        g.add_argument("--dtype", default="auto"),
        g.add_argument("--seed", type=int, default=0),
        g.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (faster start, slower decode)"),
        g.add_argument("--enable-sleep-mode", action="store_true", help="allow sleep / wake (GPU only)"),
        g.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                       help="any other vLLM engine argument, e.g. --engine-arg enable_prefix_caching=false (repeatable)"),
    ]


def _liveness_args(p: argparse.ArgumentParser) -> list:
    return [p.add_argument("--heartbeat-s", type=float, default=config.HEARTBEAT_S,
                           help=f"heartbeat interval; a peer silent for {config.LIVENESS} of them is dead "
                                f"(default {config.HEARTBEAT_S})")]


def _listen_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--front", default=None,
                   help=f"address for clients (default $ROLLOUTD_ADDRESS, else {config.DEFAULT_FRONT})")
    p.add_argument("--back", default=None,
                   help=f"address for workers (default $ROLLOUTD_BACK, else {config.DEFAULT_BACK})")


# Address options: (attribute, flag, environment variable, default).
_ADDRESSES = (("front", "--front", "ROLLOUTD_ADDRESS", config.DEFAULT_FRONT),
              ("back", "--back", "ROLLOUTD_BACK", config.DEFAULT_BACK),
              ("broker", "--broker", "ROLLOUTD_BACK", config.DEFAULT_BACK),
              ("address", "--address", "ROLLOUTD_ADDRESS", config.DEFAULT_FRONT))


def _keys_args(p: argparse.ArgumentParser, listens: bool = False) -> None:
    p.add_argument("--keys", default=None, metavar="DIR",
                   help="CURVE keys folder from `rolloutd keys generate` (default: $ROLLOUTD_KEYS; none: no authentication)")
    if listens:
        p.add_argument("--insecure", action="store_true",
                       help="allow listening on a non-loopback address without keys (anyone who reaches it may "
                            "submit work and register workers)")


def _drain_arg(p: argparse.ArgumentParser, what: str):
    return p.add_argument("--drain-s", type=float, default=config.DRAIN_S,
                          help=f"on SIGTERM, how long requests in flight may still finish before {what} "
                               f"(default {config.DRAIN_S:g}, $ROLLOUTD_DRAIN_S; a second signal aborts at once)")


def _worker_args(p: argparse.ArgumentParser) -> list:
    """What every worker takes: the engine's options, its drain, capacity and heartbeat."""
    return [*_engine_args(p), *_liveness_args(p),
            _drain_arg(p, "they are aborted with their partial output delivered"),
            p.add_argument("--capacity", type=int, default=None,
                           help="sequences a worker accepts at once (default 4x the engine's max-num-seqs)")]


def _engine_options(a):
    import dataclasses

    from .engine import EngineOptions
    from .models import resolve

    extra = {}
    for kv in a.engine_arg:
        k, sep, v = kv.partition("=")
        if not sep:
            raise SystemExit(f"--engine-arg wants KEY=VALUE, got {kv!r}")
        extra[k.replace("-", "_")] = _literal(v)
    same = {f.name: getattr(a, f.name) for f in dataclasses.fields(EngineOptions) if hasattr(a, f.name)}
    return EngineOptions(**{**same, "model": resolve(a.model), "extra": extra})


def _literal(v: str):
    try:
        return json.loads(v)
    except ValueError:
        return v


def _passthrough(a, actions: list) -> list[str]:
    """The flags that give a worker these options (from `up`'s parsed namespace), as the worker parses them."""
    out = []
    for act in actions:
        v, flag = getattr(a, act.dest), act.option_strings[0]
        if isinstance(act, argparse._StoreTrueAction):
            out += [flag] if v else []
        elif isinstance(act, argparse._AppendAction):
            for item in v:
                out += [flag, item]
        elif v is not None:
            out += [flag, str(v)]
    return out


def cpu_bind(worker: int, workers: int, tp: int, ncpu: int | None = None) -> str:
    """vLLM CPU's thread binding for a tensor-parallel worker: its own cores, one list per TP rank ("auto"
    binds every rank to the first core). Workers without TP are left to "auto", which keeps the other
    cores free for the processes around the engine.
    """
    ncpu = ncpu or len(os.sched_getaffinity(0))
    ranks = workers * tp
    per = max(1, ncpu // ranks)
    lists = []
    for r in range(worker * tp, worker * tp + tp):
        first = (r * per) % ncpu
        lists.append(f"{first}-{first + per - 1}" if per > 1 else str(first))
    return "|".join(lists)


# ------------------------------------------------------------------------------------------------ commands

def cmd_up(a) -> int:
    from . import auth
    from .launcher import Launcher, child_cmd, gpu_count, has_gpu
    from .models import NAMES, resolve
    from .preflight import UsageError, check_listen, check_model, check_numbers

    # Mistakes first, each one line within a second: nothing has started yet.
    check_model(a.model, NAMES)
    check_numbers(heartbeat_s=a.heartbeat_s, tensor_parallel_size=a.tensor_parallel_size)
    if a.workers < 0 or a.drain_s < 0:
        raise UsageError("--workers and --drain-s cannot be negative")
    if a.kv_cache_gb is not None and a.gpu_memory_utilization is not None:
        raise UsageError("--kv-cache-gb and --gpu-memory-utilization both size the KV cache: give one")
    if a.enable_sleep_mode and not has_gpu():
        raise UsageError("--enable-sleep-mode needs a GPU: vLLM cannot sleep on CPU")
    keys = auth.keys_dir(a.keys)
    security = ["--keys", keys] if keys else []
    for address in (a.front, a.back):
        auth.check_bind(address, keys, a.insecure)
        check_listen(address)

    resolve(a.model)  # prepare a built-in model once here, not in every worker at the same time
    gpus = gpu_count()
    workers = a.workers or max(1, gpus // a.tensor_parallel_size)
    if gpus and workers * a.tensor_parallel_size > gpus:
        raise UsageError(f"{workers} worker(s) x tp {a.tensor_parallel_size} needs more than the {gpus} GPU(s) here")
    host = socket.gethostname()
    worker_cmds = []
    for i in range(workers):
        env = {}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i * a.tensor_parallel_size + j) for j in range(a.tensor_parallel_size))
        elif a.tensor_parallel_size > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_bind(i, workers, a.tensor_parallel_size)
        cmd = child_cmd("worker", "--broker", a.back, "--id", f"{host}-w{i}", *security, *_passthrough(a, a.forward))
        worker_cmds.append((cmd, env))
    # The broker drains as long as the workers: systemd and slurm signal it together with them.
    broker = child_cmd("broker", "--front", a.front, "--back", a.back, "--heartbeat-s", str(a.heartbeat_s),
                       "--drain-s", str(a.drain_s), *security, *(["--insecure"] if a.insecure else []))
    # Past the drain, a worker still aborts, delivers and shuts its engine down: then the launcher kills.
    return Launcher(broker, worker_cmds, a.front, stop_timeout_s=a.drain_s + 60, keys=keys).run()


def cmd_broker(a) -> int:
    from . import auth
    from .broker import Broker, return_large_frees_to_os
    from .preflight import check_listen

    import zmq

    for address in (a.front, a.back):
        check_listen(address)
    return_large_frees_to_os()
    ctx = zmq.Context()  # its own, so that ending it waits for the last messages to leave
    try:
        b = Broker(a.front, a.back, heartbeat_s=a.heartbeat_s, max_pending=a.max_pending,
                   max_pending_bytes=a.max_pending_bytes, max_client_bytes=a.max_client_bytes, drain_s=a.drain_s,
                   keys=auth.keys_dir(a.keys), insecure=a.insecure, ctx=ctx)
    except OSError as e:
        print(f"rolloutd broker: {e}", file=sys.stderr)
        return 2
    b.install_signal_handlers()
    b.run()
    ctx.term()
    return 0


def cmd_worker(a) -> int:
    from .worker import run_worker

    from . import auth
    from .models import NAMES
    from .preflight import check_model

    from .engine import EngineStartError

    check_model(a.model, NAMES)
    try:
        return run_worker(_engine_options(a), a.broker, worker_id=a.id, capacity=a.capacity,
                          weight_version=a.weight_version, heartbeat_s=a.heartbeat_s, drain_s=a.drain_s,
                          keys=auth.keys_dir(a.keys))
    except EngineStartError as e:
        print(f"rolloutd worker: the vLLM engine did not start: {e}", file=sys.stderr)
        return 3


def cmd_generate(a) -> int:
    from .client import Client

    prompts = a.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        raise SystemExit("no prompt: pass --prompt TEXT (repeatable) or lines on stdin")
    if not a.raw:
        prompts = [[{"role": "user", "content": t}] for t in prompts]
    sampling = dict(n=a.n, temperature=a.temperature, top_p=a.top_p, max_tokens=a.max_tokens, seed=a.seed)
    with Client(a.address, timeout=a.timeout, keys=a.keys) as c:
        results = c.generate(prompts, **sampling)
    for prompt, r in zip(a.prompt or prompts, results):
        if a.json:
            print(json.dumps({"prompt": prompt, "worker": r.worker, "weight_version": r.weight_version,
                              "samples": [{"text": s.text, "token_ids": s.token_ids, "finish_reason": s.finish_reason}
                                          for s in r.samples]}))
            continue
        print(f"> {prompt if isinstance(prompt, str) else prompt[-1]['content']}")
        for s in r.samples:
            print(f"  [{r.worker}, {s.finish_reason}] {s.text.strip()}")
    return 0


def cmd_status(a) -> int:
    from .client import Client

    with Client(a.address, keys=a.keys) as c:
        st = c.status(timeout=a.timeout)
    if a.json:
        print(json.dumps(st, indent=2))
        return 0
    rows = [("WORKER", "MODEL", "DEVICES", "IN-FLIGHT", "CAPACITY", "WEIGHTS", "PID")]
    for w in st["workers"]:
        rows.append((w["id"], os.path.basename(w["model"].rstrip("/")), ",".join(w["devices"]), str(w["inflight"]),
                     str(w["capacity"]), f"v{w['weight_version']}", str(w["pid"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    print(f"{len(st['workers'])} worker(s), {st['requests']} request(s) in flight, {st['pending']} waiting")
    return 0


def cmd_abort(a) -> int:
    from .client import Client

    if not a.all and not a.ids:
        raise SystemExit("name request ids, or --all")
    with Client(a.address, keys=a.keys) as c:
        reply = c.abort_all(timeout=a.timeout) if a.all else c.abort(a.ids, timeout=a.timeout)
    print(json.dumps(dataclasses.asdict(reply), indent=2))
    return 0 if reply.ok else 1


def cmd_state(a) -> int:
    """pause / resume / sleep / wake: one aggregated reply, per worker."""
    from .client import Client

    with Client(a.address, keys=a.keys) as c:
        if a.cmd == "pause":
            reply = c.pause(a.mode, refuse=a.refuse, timeout=a.timeout)
        elif a.cmd == "resume":
            reply = c.resume(timeout=a.timeout)
        elif a.cmd == "sleep":
            reply = c.sleep(a.level, timeout=a.timeout)
        else:
            reply = c.wake_up(a.tags, timeout=a.timeout)
    print(json.dumps(dataclasses.asdict(reply), indent=2))
    return 0 if reply.ok else 1


def cmd_models(a) -> int:
    from .models import prepare

    print(prepare(a.name, force=a.force))
    return 0


def cmd_keys(a) -> int:
    from . import auth

    directory = a.dir or auth.keys_dir(None) or os.path.join(os.path.expanduser("~"), ".config", "rolloutd", "keys")
    w = auth.generate_keys(directory, force=a.force)
    d = os.path.dirname(w["broker"])
    rel = {k: os.path.relpath(v, d) for k, v in w.items()}
    print(f"wrote CURVE keys to {d} (secret files 0600, folder 0700):")
    rows = [(rel["broker"], "the broker's pair", "broker host only"),
            (rel["broker_public"], "the broker's public key", "every host"),
            (rel["worker"], "a worker's pair", "worker hosts"),
            (rel["client"], "a client's pair", "client (trainer) hosts"),
            (rel["workers"] + "/", "public keys allowed to register workers", "broker host"),
            (rel["clients"] + "/", "public keys allowed to send work", "broker host")]
    for row in rows:
        print(f"  {row[0]:<20} {row[1]:<42} -> {row[2]}")
    print(f"""
Copy to each machine only what it needs (over ssh; *.key_secret must stay private), into a folder DIR there,
and point rolloutd at it with --keys DIR or {auth.ENV}=DIR:
  broker host:  broker.key_secret, workers/, clients/   rolloutd broker --keys DIR ... (or rolloutd up --keys DIR)
  worker hosts: broker.key, worker.key_secret           rolloutd worker --keys DIR ...
  client hosts: broker.key, client.key_secret           Client(address, keys=DIR), rolloutd generate --keys DIR ...
To admit another worker or client key, put its public .key file into workers/ or clients/ and restart the broker.""")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="rolloutd", description=DESCRIPTION,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--log-level", default=os.environ.get("ROLLOUTD_LOG_LEVEL", "INFO"))
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    p = sub.add_parser("up", help="broker + local workers in the foreground (systemd / slurm ready)",
                       description="Start a broker and N local workers; stop them all on SIGTERM / Ctrl-C: "
                                   "requests in flight may finish for --drain-s, the rest are aborted with their "
                                   "partial outputs delivered. A second signal (a second or more later) aborts at "
                                   "once, a third kills.")
    p.add_argument("--workers", type=int, default=0, help="workers to start (default: one per GPU group, 1 on CPU)")
    _listen_args(p)
    forward = _worker_args(p)
    _keys_args(p, listens=True)
    p.set_defaults(func=cmd_up, forward=forward)

    p = sub.add_parser("broker", help="the broker alone (multi-node launches)")
    _listen_args(p)
    p.add_argument("--max-pending", type=int, default=config.MAX_PENDING,
                   help=f"requests held while every worker is full, then refused as busy (default {config.MAX_PENDING})")
    p.add_argument("--max-pending-bytes", type=int, default=config.MAX_PENDING_BYTES,
                   help=f"bytes of prompts held while every worker is full, all clients together "
                        f"(default {config.MAX_PENDING_BYTES})")
    p.add_argument("--max-client-bytes", type=int, default=config.MAX_CLIENT_BYTES,
                   help=f"the same for one client (default {config.MAX_CLIENT_BYTES})")
    _drain_arg(p, "the broker aborts them at their workers and forwards the partial outputs")
    _liveness_args(p)
    _keys_args(p, listens=True)
    p.set_defaults(func=cmd_broker)

    p = sub.add_parser("worker", help="one worker (one GPU or TP group) connecting to a broker")
    p.add_argument("--broker", default=None,
                   help=f"the broker's worker address (default $ROLLOUTD_BACK, else {config.DEFAULT_BACK})")
    p.add_argument("--id", default=None, help="worker id (default HOST-PID)")
    p.add_argument("--weight-version", type=int, default=0, help="version of the weights it starts with")
    _worker_args(p)
    _keys_args(p)
    p.set_defaults(func=cmd_worker)

    def client_args(p):
        p.add_argument("--address", default=None,
                       help=f"the broker (default $ROLLOUTD_ADDRESS, else {config.DEFAULT_FRONT})")
        p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait (default 600)")
        p.add_argument("--json", action="store_true", help="JSON output")
        _keys_args(p)

    p = sub.add_parser("generate", help="ask the daemon; prints the answers")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable; default: lines of stdin)")
    p.add_argument("--raw", action="store_true", help="send prompts as plain text, not as a user chat message")
    p.add_argument("-n", type=int, default=1, help="samples per prompt")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=None)
    client_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("status", help="the workers behind the broker")
    client_args(p)
    p.set_defaults(func=cmd_status, timeout=5.0)

    p = sub.add_parser("abort", help="abort requests by id, or --all")
    p.add_argument("ids", nargs="*", help="request ids")
    p.add_argument("--all", action="store_true", help="abort everything in flight")
    client_args(p)
    p.set_defaults(func=cmd_abort, timeout=30.0)

    p = sub.add_parser("pause", help="pause every worker (for a weight update, say)")
    p.add_argument("--mode", choices=["abort", "wait", "keep"], default="abort",
                   help="abort: abort in flight; wait: let in flight finish; keep: freeze until resume (default abort)")
    p.add_argument("--refuse", action="store_true", help="refuse new requests while paused (default: they wait)")
    client_args(p)
    p.set_defaults(func=cmd_state, timeout=120.0)
    p = sub.add_parser("resume", help="resume every worker")
    client_args(p)
    p.set_defaults(func=cmd_state, timeout=60.0)
    p = sub.add_parser("sleep", help="vLLM sleep mode on every worker (GPU; start workers with --enable-sleep-mode)")
    p.add_argument("--level", type=int, choices=[1, 2], default=1, help="1: offload weights; 2: drop them (default 1)")
    client_args(p)
    p.set_defaults(func=cmd_state, timeout=120.0)
    p = sub.add_parser("wake", help="wake every worker from sleep")
    p.add_argument("--tags", nargs="*", default=[], choices=["weights", "kv_cache"], help="what to bring back (default all)")
    client_args(p)
    p.set_defaults(func=cmd_state, timeout=120.0)

    p = sub.add_parser("models", help="built-in models")
    msub = p.add_subparsers(dest="models_cmd", required=True, metavar="ACTION")
    mp = msub.add_parser("prepare", help="build a built-in model into the cache and print its path")
    mp.add_argument("name", choices=["smollm2", "tiny"])
    mp.add_argument("--force", action="store_true", help="rebuild even if cached")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("keys", help="CURVE keys for the broker, workers and clients")
    ksub = p.add_subparsers(dest="keys_cmd", required=True, metavar="ACTION")
    kp = ksub.add_parser("generate", help="write broker, worker and client key pairs and the allowlists")
    kp.add_argument("--dir", default=None,
                    help="the keys folder (default: $ROLLOUTD_KEYS, else ~/.config/rolloutd/keys)")
    kp.add_argument("--force", action="store_true", help="replace existing keys (every host then needs the new files)")
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("bench", add_help=False, prefix_chars="\0",
                       help="the same workloads on vLLM in-process, through rolloutd and through Ray, side by side "
                            "(perf/bench.py of a source checkout; `rolloutd bench --help`)")
    p.add_argument("args", nargs="*", help="perf/bench.py's own options")
    p.set_defaults(func=cmd_bench)
    return ap


def cmd_bench(a) -> int:
    from .preflight import UsageError
    from .testing import SOURCE

    script = os.path.join(SOURCE, "perf", "bench.py")
    if not os.path.exists(script):
        raise UsageError(f"the benchmark harness lives in a source checkout (perf/bench.py); none beside {SOURCE}")
    os.execv(sys.executable, [sys.executable, script, *a.args])


def main(argv: list[str] | None = None) -> int:
    from .errors import BrokerUnreachable, RolloutdError
    from .preflight import UsageError, address, unreachable_hint

    a = build_parser().parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for attr, flag, env, default in _ADDRESSES:
        if hasattr(a, attr):
            setattr(a, attr, address(getattr(a, attr), flag, env, default))
    try:
        return a.func(a)
    except UsageError as e:
        print(f"rolloutd {a.cmd}: {e}", file=sys.stderr)
        return 2
    except BrokerUnreachable as e:
        no_answer = hasattr(a, "address") and ("could not reach" in str(e) or "no answer" in str(e))
        print(f"rolloutd {a.cmd}: {unreachable_hint(a.address) if no_answer else e}", file=sys.stderr)
        return 2
    except RolloutdError as e:
        print(f"rolloutd {a.cmd}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
