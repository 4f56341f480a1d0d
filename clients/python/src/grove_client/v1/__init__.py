"""The generated gRPC code of Grove's API (package grove.v1).

``sandbox_pb2`` (messages) and ``sandbox_pb2_grpc`` (stubs) are generated from
``proto/sandbox.proto`` with grpcio-tools when the package is built (``setup.py``); they are
not in the source tree.
"""
