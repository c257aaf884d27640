"""The real worker with one fault injected, chosen by the FAULT variable.

Started through --worker-python (which runs `<python> -m worker ...`), so the
gateway meets it exactly as it would meet a worker that went wrong:

  stuck      the engine stops stepping after a few steps, while the stdin
             reader keeps answering heartbeats (a wedged Metal command or
             prefill)
  garbage    a stray line of text lands on the protocol stream before every
             token notification (a library printing where it should not)
  oversized  the first generate is answered with a frame over the size cap
  refuse     every generate is refused as if the memory ceiling were reached
  abort      after a few steps the process aborts with Metal's out-of-memory
             message, as a GPU out of memory does
  poison     a generate whose params mention POISON aborts the process (a
             request that crashes the engine, whichever worker gets it)
  slow       every decode step takes STEP_DELAY_S longer (0.02 s unless set),
             so a reply of a few hundred tokens lasts seconds on any machine
             and a test never races the model
  step_oom   the first decode step after the file $OOM_GATE appears raises
             MLX's out-of-memory error (and removes the file), so a test
             chooses the moment; the engine's own recovery handles it
  slow_load  loading the model takes LOAD_DELAY_S (30 s unless set) longer
  script     the model writes SCRIPT_TEXT, token by token, then its end token,
             whatever it is asked (a model that calls tools, on demand)
  deaf       ignores the shutdown RPC, its stdin closing and SIGTERM, so only
             SIGKILL ends it (each refusal is written to stderr)
  crash_load loading a checkpoint whose path contains "broken" kills the
             process (a segfault in the loader); other models load as usual
  mute       at its first generate the worker points its protocol output at /dev/null
             and lives on: the gateway sees its output close, not its exit
"""

import os
import signal
import sys
import time

from worker import lifeline

lifeline.close_stray_stdio()
lifeline.die_with_parent()
lifeline.tolerate_fd_limit()


from worker import engine, protocol, requests, server  # noqa: E402

FAULT = os.environ.get("FAULT", "")

if FAULT == "stuck":
    step = engine.Engine._step

    def stuck_step(self):
        if self.steps >= 5:
            time.sleep(3600)
        step(self)

    engine.Engine._step = stuck_step

elif FAULT in ("garbage", "oversized"):
    send = server.FrameWriter.send

    def faulty_send(self, data):
        if FAULT == "garbage" and b'"method":"tokens"' in data:
            send(self, b"loading weights... 100%\n")
        if FAULT == "oversized" and b'"method":"tokens"' in data:
            send(
                self,
                b'{"jsonrpc":"2.0","method":"tokens","params":{"pad":"'
                + b"x" * (protocol.MAX_FRAME_BYTES + 10)
                + b'"}}\n',
            )
        send(self, data)

    server.FrameWriter.send = faulty_send

elif FAULT == "abort":
    step = engine.Engine._step

    def aborting_step(self):
        if self.steps >= 5:
            sys.stderr.write(
                "libc++abi: terminating due to uncaught exception of type "
                "std::runtime_error: [METAL] Command buffer execution failed: "
                "Insufficient Memory (00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory)\n"
            )
            sys.stderr.flush()
            os.abort()
        step(self)

    engine.Engine._step = aborting_step

elif FAULT == "poison":
    prepare = requests.prepare

    def poisoned_prepare(loaded, request_id, params):
        if "POISON" in repr(params):
            os.abort()
        return prepare(loaded, request_id, params)

    requests.prepare = poisoned_prepare
elif FAULT == "slow":
    delay = float(os.environ.get("STEP_DELAY_S", "0.02"))
    step = engine.Engine._step

    def slow_step(self):
        time.sleep(delay)
        step(self)

    engine.Engine._step = slow_step

elif FAULT == "step_oom":
    step = engine.Engine._step
    gate = os.environ["OOM_GATE"]

    def oom_step(self):
        if os.path.exists(gate):
            os.unlink(gate)
            real_next = self._generator.next

            def failing_next():
                self._generator.next = real_next
                raise RuntimeError("[metal::malloc] Attempting to allocate 1 bytes: out of memory")

            self._generator.next = failing_next
        step(self)

    engine.Engine._step = oom_step

elif FAULT == "slow_load":
    load = engine.Engine._load

    def slow_load(self, rpc_id, params):
        time.sleep(float(os.environ.get("LOAD_DELAY_S", "30")))
        load(self, rpc_id, params)

    engine.Engine._load = slow_load

elif FAULT == "script":
    import mlx.core as mx

    load = engine.Engine._load

    def scripted_load(self, rpc_id, params):
        load(self, rpc_id, params)
        if self.loaded is None:
            return
        tokenizer = self.loaded.tokenizer
        ids = tokenizer.encode(os.environ["SCRIPT_TEXT"], add_special_tokens=False)
        ids.append(next(iter(self.loaded.eos)))

        def make_sampler(params):
            script = iter(ids)

            def sample(logprobs):
                token = next(script, ids[-1])
                return mx.array([token] * logprobs.shape[0], dtype=mx.uint32)

            return sample

        engine.make_sampler = make_sampler

    engine.Engine._load = scripted_load

elif FAULT == "deaf":

    def ignore_term(signum, frame):
        sys.stderr.write("fault: ignoring SIGTERM\n")
        sys.stderr.flush()

    signal.signal(signal.SIGTERM, ignore_term)
    run = server.Dispatcher.run

    def deaf_run(self):
        run(self)  # returns at EOF, having asked the engine to stop
        sys.stderr.write("fault: ignoring the end of stdin\n")
        sys.stderr.flush()
        while True:
            time.sleep(3600)

    server.Dispatcher.run = deaf_run
    drain = engine.Engine._drain

    def deaf_drain(self, block):
        command = None
        try:
            command = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except Exception:
            return True
        if command.name in ("shutdown", "stop"):
            sys.stderr.write(f"fault: ignoring {command.name}\n")
            sys.stderr.flush()
            return True
        self._inbox.put(command)
        return drain(self, False)

    engine.Engine._drain = deaf_drain
elif FAULT == "crash_load":
    load = engine.Engine._load

    def crashing_load(self, rpc_id, params):
        if "broken" in params.get("path", ""):
            sys.stderr.write("Fatal Python error: Segmentation fault while loading weights\n")
            sys.stderr.flush()
            os._exit(139)
        load(self, rpc_id, params)

    engine.Engine._load = crashing_load

elif FAULT == "mute":
    insert = engine.Engine._insert

    def muting_insert(self, jobs):
        devnull = os.open(os.devnull, os.O_WRONLY)
        # The protocol's private copy of fd 1: its pipe's last write end closes.
        os.dup2(devnull, self._send.__self__._fd)
        insert(self, jobs)

    engine.Engine._insert = muting_insert

elif FAULT == "refuse":
    engine.Engine.over_memory = lambda self: True
    engine.Engine.memory_limit_mb = 1.0

args = sys.argv[1:]
if args[:2] == ["-m", "worker"]:
    args = args[2:]
server.main(args)
