"""Checkpoint, config and log files: reading them with one clear error naming the bad file, and writing them
durably (fsync before the rename, then the folder), so a crash or a power loss never leaves a renamed but
incomplete file; videos written the same way (VideoFile). Imports nothing of the repository: every other module may use it."""
import json
import os
import pickle
import queue
import re
import threading
import zipfile

import imageio
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


class VideoFile:
    """An mp4 written frame by frame as blocks are decoded, under a temporary name renamed when complete:
    memory stays bounded by a few blocks, and a crash never leaves a half-written file at `path`.

    A writer thread feeds ffmpeg, so that the caller (the GPU) goes on with the next block while the encoder takes
    this one: the pipe to ffmpeg blocks until the encoder has taken the frames (1.1-2.6 s per 81 frames of 480x832
    on 2 CPU cores, smooth to noise-like content), time the GPU would otherwise sit idle."""

    def __init__(self, path, fps=16):
        self.path = path
        self.tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".tmp-{os.getpid()}-{os.path.basename(path)}")
        self.writer = imageio.get_writer(self.tmp, fps=fps, format="FFMPEG", macro_block_size=1)
        self.frames, self.failed = 0, None
        self.pending = queue.Queue(maxsize=4)  # blocks on their way to ffmpeg: host memory bounded
        self.thread = threading.Thread(target=self._feed, daemon=True)
        self.thread.start()

    def write(self, frames):
        """frames [F, 3, H, W] in [0, 1], on any device: made uint8 there and copied to the host without waiting."""
        self._raise()
        u8 = (frames.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
        if u8.is_cuda:
            host = torch.empty(u8.shape, dtype=torch.uint8, pin_memory=True)
            host.copy_(u8, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        else:
            host, ready = u8.contiguous(), None
        self.pending.put((host, ready))
        self.frames += frames.shape[0]

    def _feed(self):
        while (item := self.pending.get()) is not None:
            try:
                if self.failed is None:  # after a failure the rest is drained, not written
                    host, ready = item
                    ready is not None and ready.synchronize()
                    for f in host.numpy():
                        self.writer.append_data(f)
            except Exception as e:
                self.failed = e
            finally:
                self.pending.task_done()
        self.pending.task_done()

    def flush(self):
        """Wait until ffmpeg has taken every frame written so far."""
        self.pending.join()
        self._raise()

    def _raise(self):
        if self.failed is not None:
            raise RuntimeError(f"writing {self.path} failed: {type(self.failed).__name__}: {self.failed}")

    def __enter__(self):
        return self

    def __exit__(self, error, *_):
        self.pending.put(None)
        self.thread.join()
        self.writer.close()
        if error is None and self.failed is None:
            os.replace(self.tmp, self.path)
            return
        if os.path.exists(self.tmp):
            os.remove(self.tmp)
        if error is None:
            self._raise()


def save_video(frames, path, fps=16):
    """frames [F, 3, H, W] in [0, 1] -> mp4, never half-written."""
    with VideoFile(path, fps) as video:
        video.write(frames)
