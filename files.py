"""Checkpoint, config and log files: reading them with one clear error naming the bad file, and writing them
durably (fsync before the rename, then the folder), so a crash or a power loss never leaves a renamed but
incomplete file. Imports nothing of the repository: every other module may use it."""
import json
import os
import pickle
import re
import zipfile

import torch


def need_file(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    return path


def read_safetensors(path):
    """{name: tensor} from a .safetensors file; a missing, truncated or garbled file is a ValueError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(need_file(path))
    except SafetensorError as e:
        raise ValueError(f"{path}: damaged or not a safetensors file ({e})") from None


def read_torch(path, mmap=False):
    """A torch.save file read as data only (weights_only): a pickle that refers to code is refused, never run."""
    need_file(path)
    zipped = zipfile.is_zipfile(path)  # mmap needs torch's zip format; the legacy format loads without it
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipped)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))  # the pickle names a function or class to call
        if found:
            raise ValueError(f"{path} holds code ({found.group(1)}), not only tensors: refused (checkpoints are "
                             f"read as data)") from None
        raise ValueError(f"{path}: damaged or not a torch checkpoint (unpickling failed)") from None
    except Exception as e:  # noqa: BLE001 -- torch's zip/legacy readers raise KeyError, RuntimeError, EOFError...
        raise ValueError(f"{path}: damaged or not a torch checkpoint ({type(e).__name__}: {e})") from None


def read_json(path):
    try:
        with open(need_file(path)) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def fsync(path):
    """Flush a file's or a folder's contents (a folder: its entries, e.g. a rename) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(tmp, final):
    """Rename `tmp` (a file, or a folder of files) to `final` once its contents are on the disk, then make the
    rename itself durable: after a power loss `final` is either the old one or the whole new one."""
    if os.path.isdir(tmp):
        for name in os.listdir(tmp):
            fsync(os.path.join(tmp, name))
    fsync(tmp)
    os.replace(tmp, final)
    fsync(os.path.dirname(os.path.abspath(final)))


def write_text_durably(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    replace_durably(tmp, path)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


STALE_TMP = re.compile(r"\.tmp-(\d+)-.+")  # VideoFile's temporary name: .tmp-<pid>-<final name>


def remove_stale_tmp(folder):
    """Remove the temporary files that writers killed mid-write left in `folder` (their process is gone)."""
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        found = STALE_TMP.fullmatch(name)
        if found and not pid_alive(int(found.group(1))):
            os.remove(os.path.join(folder, name))
            print(f"removed {os.path.join(folder, name)}, left by an interrupted write")
