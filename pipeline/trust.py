"""What a job file may decide alone, and what the user must confirm.

    check_base_url(Destination(url, origin="job", key_var="OPENAI_API_KEY", ...))
    check_output_place(job, output, chosen_by_user=False, trusted=False)
    refuse_links([output, journal])

A job file is shared and downloaded like any document, so it cannot choose where the
user's secrets go or which of the user's files are overwritten:

- a key goes to a host the user chose: the provider's default host, `--base-url`, the
  provider's `*_BASE_URL` variable, or a host the job file names once the user confirms
  it with `--trust-job-hosts` or `PIPELINE_TRUST_JOB_HOSTS=1`. Loopback hosts are no
  exception: another user's process can listen on 127.0.0.1 too. With no key to send
  there is nothing to confirm, so a keyless local server named by a job just works;
- nothing goes over plain http:// to a host that is not this machine, whoever chose it:
  the key and every prompt would cross the network readable by anyone on the way;
- a job file writes its output inside its own folder or the current folder (the sample
  jobs write `../out/` from `jobs/`, run from the repository); anywhere else needs the
  same confirmation, while `--output` is the user's own choice;
- nothing is written through a symbolic link: that overwrote the link's target.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from yarl import URL

from pipeline.errors import OutputRefused, SpecError, Untrusted

#: Set to 1 (or true/yes) to confirm every host and output place the job files name.
TRUST_ENV = "PIPELINE_TRUST_JOB_HOSTS"
_YES = frozenset({"1", "true", "yes", "on"})
_HOW_TO_TRUST = f"add --trust-job-hosts (or set {TRUST_ENV}=1)"

Origin = Literal["flag", "env", "job", "default"]


def trusted(flag: bool, env: Mapping[str, str]) -> bool:
    """The user confirmed the job file's hosts and output place."""
    return flag or env.get(TRUST_ENV, "").strip().lower() in _YES


def is_loopback(host: str) -> bool:
    """This machine by name or address: localhost, 127.0.0.0/8, ::1."""
    host = host.strip("[]").lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


@dataclass(frozen=True)
class Destination:
    """Where requests go, who chose it, and the key that would go with them."""

    base_url: str
    origin: Origin
    #: The environment variable the key comes from, and the one that sets the URL.
    key_var: str
    url_var: str
    has_key: bool
    #: The provider's public API, when it has one: always fine.
    default_url: str | None
    job_file: Path
    trusted: bool

    @property
    def chosen_by(self) -> str:
        return {
            "flag": "--base-url",
            "env": f"${self.url_var}",
            "job": f"base_url in {self.job_file}",
            "default": "the provider's default",
        }[self.origin]


def check_base_url(dest: Destination) -> None:
    """Refuse a base URL the key must not go to; raise before anything is sent."""
    try:
        url = URL(dest.base_url)
    except ValueError as exc:
        raise SpecError(
            f"base URL {dest.base_url!r} ({dest.chosen_by}) is not a URL: {exc}"
        ) from None
    host = url.host
    if not host:
        raise SpecError(
            f"base URL {dest.base_url!r} ({dest.chosen_by}) names no host: "
            "write it as https://host/v1"
        )
    where = f"{host}:{url.explicit_port}" if url.explicit_port else host
    if url.scheme == "http" and not is_loopback(host):
        raise SpecError(
            f"base URL {dest.base_url} ({dest.chosen_by}) is plain http:// to {where}, which "
            "is not this machine: the key and the prompts would cross the network "
            "unencrypted. Use https://, or a tunnel to a loopback port "
            f"(ssh -L 8000:{where} ...; then --base-url http://127.0.0.1:8000/v1)"
        )
    if dest.origin != "job" or not dest.has_key or dest.trusted:
        return
    if dest.default_url is not None and _same_origin(url, URL(dest.default_url)):
        return
    raise Untrusted(
        f"{dest.job_file} sets base_url {dest.base_url}: the key in ${dest.key_var} would "
        f"go to {where}, a host only the job file chose. If you trust it, {_HOW_TO_TRUST}; "
        f"or give the URL yourself with --base-url or ${dest.url_var}; or unset "
        f"{dest.key_var} if that server needs no key"
    )


def _same_origin(a: URL, b: URL) -> bool:
    return (a.scheme, a.host, a.port) == (b.scheme, b.host, b.port)


def check_output_place(
    output: Path, *, job_file: Path, job_root: Path, chosen_by_user: bool, trusted: bool
) -> None:
    """A job file's output goes inside its folder or the current one unless confirmed."""
    if chosen_by_user or trusted:
        return
    folder = output.parent.resolve()
    places = (job_root.resolve(), Path.cwd().resolve())
    if any(folder == place or folder.is_relative_to(place) for place in places):
        return
    raise Untrusted(
        f"{job_file} writes its output to {output}, outside the job's folder "
        f"({job_root}) and the current folder: give the place yourself with --output PATH, "
        f"or, if you trust the job file, {_HOW_TO_TRUST}"
    )


def refuse_links(paths: Iterable[tuple[Path, str]]) -> None:
    """Refuse to write through a symbolic link; each path comes with the flag that moves it."""
    for path, flag in paths:
        if path.is_symlink():
            raise OutputRefused(
                f"{path} is a symbolic link (to {os.readlink(path)}): pipeline does not "
                f"write through links, which would overwrite the file they point to. "
                f"Remove the link, or choose a plain path with {flag}"
            )
