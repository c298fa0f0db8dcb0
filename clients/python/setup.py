"""Builds the package with gRPC stubs generated from the service's protos.

The stubs are generated at build time, not committed: protobuf's Python code checks at import
that the runtime is at least the generator's version ("NO CHECKED-IN PROTOBUF GENCODE"), so
stubs made here are pinned to the grpcio/protobuf versions installed with them, and
`proto/` at the repository root stays the one copy of the API. Generated modules go into
the top-level `tenantkms.v1` package (the import path protoc writes into them).
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
PROTO_DIR = HERE.parent.parent / "proto"
PROTOS = ["tenantkms/v1/keys.proto", "tenantkms/v1/tenants.proto", "tenantkms/v1/audit.proto"]


def generate(out_dir: Path) -> None:
    """Runs grpc_tools.protoc on PROTOS into out_dir (with package __init__ files)."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    args = ["protoc", f"-I{PROTO_DIR}", f"-I{include}", f"--python_out={out_dir}",
            f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", *PROTOS]
    if protoc.main(args) != 0:
        raise RuntimeError("grpc_tools.protoc failed on " + ", ".join(PROTOS))
    for package in ("tenantkms", "tenantkms/v1"):
        (out_dir / package / "__init__.py").write_text('"""Generated from proto/ (tenant-kms)."""\n')


class BuildWithStubs(build_py):
    """build_py, then the generated stubs into the build directory."""

    def run(self):
        super().run()
        generate(Path(self.build_lib))


def runtime_requirements():
    """grpcio and protobuf at least as new as the generator (the stubs check it at import)."""
    from importlib.metadata import version

    tools = version("grpcio-tools")
    return [
        f"grpcio>={tools}",
        f"protobuf>={version('protobuf')}",
        "cryptography>=41",
    ]


setup(
    cmdclass={"build_py": BuildWithStubs},
    install_requires=runtime_requirements(),
)
