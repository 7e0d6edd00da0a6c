"""Write the pip configuration the image build uses, taken from this machine's own (`pip config list`).

    python deploy/docker/pip_build_config.py OUT_DIR

OUT_DIR/pip.conf keeps the settings that mean the same inside a build container: network indexes (index-url,
extra-index-url, find-links over http(s)), trusted hosts, timeouts, proxies. Local paths (file:// indexes, wheel
directories) are left out: the build cannot see them. A configured CA bundle (e.g. a proxy's) is copied to
OUT_DIR/pip-ca.crt and named as /run/secrets/pip-ca, where `make image` mounts it. Both files go to the build as
BuildKit secrets, so no host, credential or certificate ends up in an image layer.
"""

import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

NETWORK_LISTS = ("index-url", "extra-index-url", "find-links")
KEPT = ("trusted-host", "timeout", "default-timeout", "retries", "proxy")
CA_SECRET = "/run/secrets/pip-ca"
LINE = re.compile(r"^(?P<section>[^.]*)\.(?P<key>[^=]+)=(?P<value>.*)$")


def host_settings() -> dict[str, str]:
    """`pip config list` merged over its files and PIP_* variables (later lines win, as pip applies them)."""
    listing = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], check=True, capture_output=True, text=True
    ).stdout
    settings: dict[str, str] = {}
    for line in listing.splitlines():
        match = LINE.match(line.strip())
        if match and match["section"] in ("global", ":env:", "install", "download"):
            settings[match["key"]] = match["value"].strip().strip("'\"")
    return settings


def build_config(settings: dict[str, str], out_dir: Path) -> configparser.ConfigParser:
    config = configparser.ConfigParser()
    config["global"] = {}
    section = config["global"]
    for key in NETWORK_LISTS:
        urls = [url for url in settings.get(key, "").split() if url.startswith(("http://", "https://"))]
        if urls:
            section[key] = " ".join(urls)
    for key in KEPT:
        if settings.get(key):
            section[key] = settings[key]
    cert = settings.get("cert")
    if cert:
        if not Path(cert).is_file():
            raise FileNotFoundError(f"pip's configured cert {cert!r} is not a file; fix `pip config` or remove it")
        shutil.copyfile(cert, out_dir / "pip-ca.crt")
        section["cert"] = CA_SECRET
    return config


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    out_dir = Path(sys.argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "pip-ca.crt").unlink(missing_ok=True)
    config = build_config(host_settings(), out_dir)
    with open(out_dir / "pip.conf", "w") as handle:
        config.write(handle)
    if not (out_dir / "pip-ca.crt").exists():
        (out_dir / "pip-ca.crt").touch()  # an empty secret: the build then uses its own CA store
    return 0


if __name__ == "__main__":
    sys.exit(main())
