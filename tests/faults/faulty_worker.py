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
  slow       every decode step takes at least 20 ms more (a slower machine),
             so a long reply runs for a known least time
  crash_load loading a checkpoint whose path contains "broken" kills the
             process (a segfault in the loader); other models load as usual
"""

import os
import sys
import time

from worker import engine, protocol, server

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

elif FAULT == "slow":
    step = engine.Engine._step

    def slow_step(self):
        time.sleep(0.02)
        step(self)

    engine.Engine._step = slow_step

elif FAULT == "crash_load":
    load = engine.Engine._load

    def crashing_load(self, rpc_id, params):
        if "broken" in params.get("path", ""):
            sys.stderr.write("Fatal Python error: Segmentation fault while loading weights\n")
            sys.stderr.flush()
            os._exit(139)
        load(self, rpc_id, params)

    engine.Engine._load = crashing_load

elif FAULT == "refuse":
    engine.Engine.over_memory = lambda self: True
    engine.Engine.memory_limit_mb = 1.0

args = sys.argv[1:]
if args[:2] == ["-m", "worker"]:
    args = args[2:]
server.main(args)
