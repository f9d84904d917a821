"""daguerre.explain.page: the one self-contained HTML page of a list of figures (issue 22)."""

from __future__ import annotations

import base64
import re

import pytest

from daguerre.explain.page import Figure, new_figure, render_page, save_figure, write_page


def _png(tmp_path, name):
    fig = new_figure(2, 1)
    fig.add_subplot().plot([0, 1], [1, 0])
    return save_figure(fig, tmp_path / name)


def test_page_embeds_each_image_with_its_sentence(tmp_path):
    a, b = _png(tmp_path, "a.png"), _png(tmp_path, "b.png")
    extra = tmp_path / "maps.safetensors"
    extra.write_bytes(b"x")
    figures = [Figure(a, "The first <figure> & its sentence."), Figure(b, "The second.", extras=(extra,))]
    page = write_page(tmp_path, "Title <t>", figures)
    text = page.read_text()
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert [base64.b64decode(u) for u in uris] == [a.read_bytes(), b.read_bytes()]  # in order, byte for byte
    assert "The first &lt;figure&gt; &amp; its sentence." in text and "<title>Title &lt;t&gt;</title>" in text
    assert 'href="maps.safetensors"' in text  # relative to the page
    assert "src=\"a.png\"" not in text and "http" not in text  # nothing outside the page is needed


def test_page_never_replaces_unless_asked(tmp_path):
    a = _png(tmp_path, "a.png")
    with pytest.raises(FileExistsError):
        save_figure(new_figure(1, 1), a)
    write_page(tmp_path, "t", [Figure(a, "one")])
    with pytest.raises(FileExistsError):
        write_page(tmp_path, "t", [Figure(a, "two")])
    assert "one" in (tmp_path / "index.html").read_text()
    write_page(tmp_path, "t", [Figure(a, "two")], replace=True)
    assert "two" in (tmp_path / "index.html").read_text()


def test_page_names_a_missing_figure(tmp_path):
    with pytest.raises(FileNotFoundError, match="gone.png"):
        write_page(tmp_path, "t", [Figure(tmp_path / "gone.png", "x")])
    assert not (tmp_path / "index.html").exists()
    assert render_page("t", []).count("<figure>") == 0
