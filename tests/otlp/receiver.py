#!/usr/bin/env python3
"""A minimal OTLP/gRPC trace receiver for tests/otlp/check.sh.

Listens on 127.0.0.1 (a free port, printed as `port <n>` on stdout), accepts
`opentelemetry.proto.collector.trace.v1.TraceService/Export`, and on SIGTERM writes every span
it received to the JSON file named by its argument: name, trace id, span id, parent span id
(hex) and attributes (as strings).
"""
import json
import signal
import sys
import threading
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

spans = []
lock = threading.Lock()


def attribute_value(value):
    kind = value.WhichOneof("value")
    return str(getattr(value, kind)) if kind else ""


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def Export(self, request, context):
        with lock:
            for resource_spans in request.resource_spans:
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        spans.append({
                            "name": span.name,
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent_span_id": span.parent_span_id.hex(),
                            "attributes": {a.key: attribute_value(a.value) for a in span.attributes},
                        })
        return trace_service_pb2.ExportTraceServiceResponse()


def main():
    out = sys.argv[1]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Receiver(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"port {port}", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    done.wait()
    server.stop(grace=1).wait()
    with lock, open(out, "w") as f:
        json.dump(spans, f)


if __name__ == "__main__":
    main()
