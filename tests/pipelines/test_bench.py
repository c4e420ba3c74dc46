import io

import decord

from pipelines.bench import SOURCES, raw_decode_fps, render_source


def test_generated_sources_decode_at_their_size_and_length() -> None:
    for source in SOURCES:
        data = render_source(source, 96, 64, 10, 1.0)
        reader = decord.VideoReader(io.BytesIO(data), num_threads=1)
        assert len(reader) == 10 and reader[0].shape == (64, 96, 3)
    frames, fps = raw_decode_fps([render_source("testsrc2", 96, 64, 10, 1.0)] * 2)
    assert frames == 20 and fps > 0
