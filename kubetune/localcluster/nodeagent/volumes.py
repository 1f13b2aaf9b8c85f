"""A pod's volumes as host directories, ready to be bind-mounted into its containers.

Every volume becomes a directory under the pod's directory except ``hostPath`` (the path
itself) and ``persistentVolumeClaim`` (the bound PersistentVolume's local path, or a
directory per claim that outlives the pod). ConfigMap, Secret, downward API and projected
contents are written at pod start and then kept in sync with their sources (see
:func:`refresh_volumes`), like kubelet's periodic volume sync.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from kubetune.localcluster.nodeagent.env import EnvError, field_ref, resource_field_ref

JSON = dict[str, Any]
SA_MOUNT_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"


class VolumeContext:
    """What building volumes needs from the agent, as callables so this module stays pure-ish."""

    def __init__(
        self,
        *,
        get_object: Callable[[str, str], JSON | None],
        request_token: Callable[[str, JSON], str],
        claim_dir: Callable[[str], Path],
    ) -> None:
        self.get_object = get_object
        self.request_token = request_token
        self.claim_dir = claim_dir


class File(NamedTuple):
    """One file of a volume: contents, mode (None: the volume's default) and owner (-1: root)."""

    content: bytes
    mode: int | None = None
    uid: int = -1
    gid: int = -1


def _write(path: Path, file: File, default_mode: int | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(file.content)
    if file.uid != -1 or file.gid != -1:
        os.chown(path, file.uid, file.gid)
    mode = file.mode if file.mode is not None else default_mode
    path.chmod(mode if mode is not None else 0o644)


def _key_files(
    data: dict[str, bytes], items: list[JSON] | None, optional: bool, what: str
) -> dict[str, File]:
    if items is None:
        return {key: File(value) for key, value in data.items()}
    files = {}
    for item in items:
        if item["key"] not in data:
            if optional:
                continue
            raise EnvError(f"{what}: key {item['key']} not found")
        files[item["path"]] = File(data[item["key"]], item.get("mode"))
    return files


def _object_files(ctx: VolumeContext, kind: str, source: JSON) -> dict[str, File]:
    name = source.get("name") or source.get("secretName") or ""
    optional = bool(source.get("optional", False))
    obj = ctx.get_object(kind, name)
    if obj is None:
        if optional:
            return {}
        raise EnvError(f'{kind} "{name}" not found')
    if kind == "secret":
        data = {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
    else:
        data = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
        data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
    return _key_files(data, source.get("items"), optional, f"{kind} {name}")


def _downward_files(pod: JSON, items: list[JSON]) -> dict[str, File]:
    files = {}
    for item in items:
        if "fieldRef" in item:
            value = field_ref(pod, item["fieldRef"]["fieldPath"])
        else:
            ref = item["resourceFieldRef"]
            container = next(
                (c for c in pod["spec"]["containers"] if c["name"] == ref.get("containerName")),
                pod["spec"]["containers"][0],
            )
            value = resource_field_ref(container, ref)
        files[item["path"]] = File(value.encode(), item.get("mode"))
    return files


def _projected_files(ctx: VolumeContext, pod: JSON, projected: JSON) -> dict[str, File]:
    files: dict[str, File] = {}
    for source in projected.get("sources", []):
        if "serviceAccountToken" in source:
            token_source = source["serviceAccountToken"]
            token = ctx.request_token(pod["spec"].get("serviceAccountName", "default"), token_source)
            files[token_source["path"]] = _token_file(pod, token.encode(), projected.get("defaultMode"))
        elif "configMap" in source:
            files.update(_object_files(ctx, "configmap", source["configMap"]))
        elif "secret" in source:
            files.update(_object_files(ctx, "secret", source["secret"]))
        elif "downwardAPI" in source:
            files.update(_downward_files(pod, source["downwardAPI"].get("items", [])))
    return files


def _token_file(pod: JSON, token: bytes, default_mode: int | None) -> File:
    """kubelet's rule for a projected token: readable by the pod's user (when every container
    runs as the same one) and group (fsGroup), else the volume's default mode."""
    spec = pod["spec"]
    pod_user = (spec.get("securityContext") or {}).get("runAsUser")
    fs_group = (spec.get("securityContext") or {}).get("fsGroup")
    users = {
        (c.get("securityContext") or {}).get("runAsUser", pod_user)
        for c in spec.get("initContainers", []) + spec["containers"]
    }
    fs_user = next(iter(users)) if len(users) == 1 else None
    if fs_user is None and fs_group is None:
        return File(token, default_mode)
    return File(
        token,
        0o640 if fs_group is not None else 0o600,
        fs_user if fs_user is not None else -1,
        fs_group if fs_group is not None else -1,
    )


def _rendered(ctx: VolumeContext, pod: JSON, volume: JSON) -> tuple[dict[str, File], int | None]:
    """The files a configMap/secret/downwardAPI/projected volume holds, and its default mode."""
    for kind, render in (
        ("configMap", lambda v: _object_files(ctx, "configmap", v)),
        ("secret", lambda v: _object_files(ctx, "secret", v)),
        ("downwardAPI", lambda v: _downward_files(pod, v.get("items", []))),
        ("projected", lambda v: _projected_files(ctx, pod, v)),
    ):
        if kind in volume:
            return render(volume[kind]), volume[kind].get("defaultMode")
    raise EnvError(f"volume {volume['name']}: unsupported volume type {sorted(set(volume) - {'name'})}")


def _sync_files(target: Path, files: dict[str, File], default_mode: int | None) -> None:
    """Make ``target`` hold exactly ``files``. Changed files are replaced by rename, so a
    reader never sees half a file; the directory itself is what is bind-mounted, so the
    container sees the new contents."""
    for rel, file in files.items():
        path = target / rel
        try:
            if path.read_bytes() == file.content:
                continue
        except OSError:
            pass
        tmp = path.with_name(f".{path.name}.tmp")
        _write(tmp, file, default_mode)
        os.replace(tmp, path)
    wanted = {target / rel for rel in files}
    for path in sorted(target.rglob("*"), reverse=True):
        if path.is_file() and path not in wanted:
            path.unlink()


def refreshable(volume: JSON) -> bool:
    """Volumes whose contents follow their sources, as kubelet's periodic sync does. Projected
    volumes with a service-account token are left alone: tokens here last long enough."""
    if "projected" in volume:
        return not any("serviceAccountToken" in src for src in volume["projected"].get("sources", []))
    return any(kind in volume for kind in ("configMap", "secret", "downwardAPI"))


def refresh_volumes(ctx: VolumeContext, pod: JSON, pod_dir: Path) -> None:
    """Bring configMap/secret/downwardAPI contents up to date with their sources."""
    for volume in pod["spec"].get("volumes", []):
        if refreshable(volume):
            try:
                files, default_mode = _rendered(ctx, pod, volume)
            except EnvError:
                continue  # a source that disappeared keeps its last contents, as in kubelet
            _sync_files(pod_dir / "volumes" / volume["name"], files, default_mode)


def prepare_volumes(ctx: VolumeContext, pod: JSON, pod_dir: Path) -> dict[str, Path]:
    """Create every volume of ``pod``; return volume name -> host path.

    Raises :class:`EnvError` when a referenced object is missing (the pod waits and retries).
    """
    paths: dict[str, Path] = {}
    for volume in pod["spec"].get("volumes", []):
        name = volume["name"]
        target = pod_dir / "volumes" / name
        if "hostPath" in volume:
            host = Path(volume["hostPath"]["path"])
            if volume["hostPath"].get("type") in ("DirectoryOrCreate", None, "") and not host.exists():
                host.mkdir(parents=True, exist_ok=True)
            elif volume["hostPath"].get("type") == "FileOrCreate" and not host.exists():
                host.parent.mkdir(parents=True, exist_ok=True)
                host.touch()
            paths[name] = host
            continue
        if "persistentVolumeClaim" in volume:
            paths[name] = ctx.claim_dir(volume["persistentVolumeClaim"]["claimName"])
            continue
        target.mkdir(parents=True, exist_ok=True)
        if "emptyDir" in volume:
            # Any user in the container may write an emptyDir, as with kubelet.
            os.chmod(target, 0o777)
        else:
            os.chmod(target, 0o755)
            _sync_files(target, *_rendered(ctx, pod, volume))
        paths[name] = target
    return paths


def container_mounts(container: JSON, volume_paths: dict[str, Path]) -> list[JSON]:
    mounts = []
    for mount in container.get("volumeMounts", []):
        source = volume_paths[mount["name"]]
        if mount.get("subPath"):
            source = source / mount["subPath"]
            if not source.exists():
                source.mkdir(parents=True)
        mounts.append(
            {"source": str(source), "target": mount["mountPath"], "readOnly": bool(mount.get("readOnly"))}
        )
    return mounts
