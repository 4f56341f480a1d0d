"""Build hook: generates the gRPC code from Grove's proto/sandbox.proto with grpcio-tools.

The proto lives outside this directory (../../proto in a checkout). pip builds a local
directory in place, so the build finds it there; an sdist carries a copy (proto/ beside this
file, written by the sdist command below) and builds from that. The generated modules go to
grove_client/v1/ in the build tree only: nothing generated is committed.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = Path(__file__).resolve().parent
PROTO_NAME = "sandbox.proto"
# Where the proto sits inside the generated package: protoc names imports after it.
PROTO_PKG = "grove_client/v1"


def find_proto() -> Path:
    """The proto file: $GROVE_PROTO, an sdist's copy, or the checkout's."""
    candidates = [
        Path(os.environ["GROVE_PROTO"]) if os.environ.get("GROVE_PROTO") else None,
        HERE / "proto" / PROTO_NAME,
        HERE.parent.parent / "proto" / PROTO_NAME,
    ]
    for c in candidates:
        if c is not None and c.is_file():
            return c
    raise SystemExit(
        f"grove-client: cannot find {PROTO_NAME} (looked in "
        f"{', '.join(str(c) for c in candidates if c is not None)}); build from a Grove "
        "checkout (pip install ./clients/python) or set GROVE_PROTO"
    )


def generate(out_root: Path) -> None:
    """Runs grpcio-tools' protoc: grove_client/v1/sandbox_pb2{,_grpc}.py{,i} under out_root."""
    try:
        import grpc_tools
        from grpc_tools import protoc
    except ImportError as e:  # pragma: no cover - build requirement
        raise SystemExit(f"grove-client: grpcio-tools is needed to build: {e}") from e
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        pkg = Path(tmp) / PROTO_PKG
        pkg.mkdir(parents=True)
        shutil.copyfile(find_proto(), pkg / PROTO_NAME)
        out_root.mkdir(parents=True, exist_ok=True)
        args = [
            "grpc_tools.protoc",
            f"-I{tmp}",
            f"-I{well_known}",
            f"--python_out={out_root}",
            f"--pyi_out={out_root}",
            f"--grpc_python_out={out_root}",
            f"{PROTO_PKG}/{PROTO_NAME}",
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"grove-client: protoc failed on {find_proto()}")


class BuildPyWithProto(build_py):
    """build_py, then the generated modules into the build tree."""

    def run(self) -> None:
        # pip builds a local directory in place: a module removed from src/ must not live
        # on in an earlier build's tree.
        shutil.rmtree(Path(self.build_lib) / "grove_client", ignore_errors=True)
        super().run()
        generate(Path(self.build_lib))


class SdistWithProto(sdist):
    """An sdist that carries the proto (it is outside this directory in a checkout)."""

    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        super().make_release_tree(base_dir, files)
        dst = Path(base_dir) / "proto"
        dst.mkdir(exist_ok=True)
        shutil.copyfile(find_proto(), dst / PROTO_NAME)


def runtime_requirements() -> list[str]:
    """grpcio and protobuf at least as new as the code generated here needs.

    The generated modules check this at import: sandbox_pb2_grpc.py wants grpcio >= the
    grpcio-tools that wrote it, sandbox_pb2.py a protobuf runtime >= its gencode version,
    which is the range grpcio-tools itself requires.
    """
    tools = importlib.metadata.version("grpcio-tools")
    reqs = [f"grpcio>={tools}"]
    for r in importlib.metadata.requires("grpcio-tools") or []:
        if r.replace(" ", "").startswith("protobuf") and ";" not in r:
            reqs.append(r)
    if len(reqs) == 1:
        reqs.append("protobuf")
    return reqs


setup(
    install_requires=runtime_requirements(),
    cmdclass={"build_py": BuildPyWithProto, "sdist": SdistWithProto},
)
