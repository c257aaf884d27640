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
  poison     a generate whose params mention POISON kills the process (a
             request that crashes the engine, whichever worker gets it)
"""

import os
import sys
import time

from worker import lifeline

lifeline.die_with_parent()
lifeline.tolerate_fd_limit()

import signal  # noqa: E402

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
            os.kill(os.getpid(), signal.SIGKILL)
        return prepare(loaded, request_id, params)

    requests.prepare = poisoned_prepare

elif FAULT == "refuse":
    engine.Engine.over_memory = lambda self: True
    engine.Engine.memory_limit_mb = 1.0

args = sys.argv[1:]
if args[:2] == ["-m", "worker"]:
    args = args[2:]
server.main(args)
