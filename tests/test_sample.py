"""sample.py end to end on the tiny model: a prompt switch, written as a decodable mp4 of the right length and
size."""


def test_sample_writes_a_decodable_mp4(tmp_path):
    import imageio
    import sample
    out = tmp_path / "fox.mp4"
    sample.main(["--prompt", "a fox|a fox runs", "--switch", "3", "--frames", "6", "--out", str(out), "--device", "cpu"])
    frames = imageio.mimread(str(out))
    assert len(frames) == 1 + 4 * (6 - 1) and frames[0].shape == (64, 64, 3)
