"""sample.py end to end on the tiny model: a prompt switch, written as a decodable mp4 of the right length and
size."""


def test_sample_writes_a_decodable_mp4(tmp_path):
    import imageio
    import sample
    out = tmp_path / "fox.mp4"
    sample.main(["--prompt", "a fox|a fox runs", "--switch", "3", "--frames", "6", "--out", str(out), "--device", "cpu"])
    frames = imageio.mimread(str(out))
    assert len(frames) == 1 + 4 * (6 - 1) and frames[0].shape == (64, 64, 3)


def test_video_file_writes_on_a_thread_the_frames_a_direct_write_gives(tmp_path):
    """VideoFile hands the blocks to ffmpeg on a writer thread: write returns while the encoder still holds an
    earlier block (the GPU goes on), flush waits for all of them, and the file decodes to the frames that one
    plain imageio write of the same uint8 frames gives. A failing encoder is raised at the end, naming the file,
    and leaves no temporary file."""
    import threading

    import imageio
    import numpy as np
    import pytest
    import torch
    from files import VideoFile
    frames = torch.nn.functional.interpolate(torch.rand(9, 3, 8, 12, generator=torch.Generator().manual_seed(3)),
                                             size=(48, 64), mode="bilinear")
    direct = tmp_path / "direct.mp4"
    with imageio.get_writer(direct, fps=16, format="FFMPEG", macro_block_size=1) as w:
        for f in (frames * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy():
            w.append_data(f)
    gate, taken = threading.Event(), []
    out = tmp_path / "threaded.mp4"
    with VideoFile(str(out)) as video:
        real = video.writer.append_data

        def held(f):  # the encoder holds the first block until the test lets it go
            gate.wait(timeout=60)
            taken.append(1)
            real(f)
        video.writer.append_data = held
        for a, b in [(0, 1), (1, 5), (5, 9)]:
            video.write(frames[a:b])
        assert taken == [] and video.frames == 9  # every write returned while ffmpeg had taken nothing
        gate.set()
        video.flush()
        assert len(taken) == 9
    np.testing.assert_array_equal(np.stack(imageio.mimread(str(out))), np.stack(imageio.mimread(str(direct))))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["direct.mp4", "threaded.mp4"]

    bad = tmp_path / "bad.mp4"
    with pytest.raises(RuntimeError, match=f"writing {bad} failed: OSError: disk full"):
        with VideoFile(str(bad)) as video:
            video.writer.append_data = lambda f: (_ for _ in ()).throw(OSError("disk full"))
            video.write(frames)
    assert not bad.exists() and not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())
