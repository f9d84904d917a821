"""What the image commands write: never a file the user did not ask to replace (--overwrite), fresh numbers,
no clobbering of a file that appears during the run, one-line errors for read-only or full folders (the
tests run as root, who ignores permissions: writes are made to fail by a file in the path or by an
injected OSError), the right progress total, the seed told, and the limit flags."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
from PIL import Image

import daguerre.fileio as fileio
from daguerre.cli import main
from daguerre.pngmeta import parse_parameters, read_png_parameters, save_png

FAST = ["--model", "random:tiny", "--steps", "2", "--size", "16x16"]


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _one_error_line(err: str, command: str = "generate") -> str:
    lines = [line for line in err.strip().splitlines() if ": error: " in line or "Traceback" in line]
    assert len(lines) == 1 and lines[0].startswith(f"daguerre {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: the error must come before any model work."""
    import daguerre.registry

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(daguerre.registry, "open_model", refuse)


@pytest.fixture
def image_file(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "in.png"
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    return path


def _listing(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- never replace what the user did not ask to replace ------------------------------------------------

def test_an_existing_out_file_is_an_error_before_any_model_work(tmp_path, capsys, no_model):
    target = tmp_path / "notes.png"
    target.write_text("not a PNG at all")
    code, out, err = _run(capsys, "generate", "a cat", *FAST, "-o", str(target))
    assert code == 2 and out == ""
    line = _one_error_line(err)
    assert str(target) in line and "--overwrite to replace it" in line
    assert target.read_text() == "not a PNG at all"


def test_overwrite_replaces_the_file(tmp_path, capsys):
    target = tmp_path / "x.png"
    target.write_text("old")
    code, out, err = _run(capsys, "generate", "a cat", *FAST, "--seed", "3", "--overwrite", "-o", str(target))
    assert code == 0, err
    assert out.strip() == str(target)
    assert parse_parameters(read_png_parameters(target))[2]["Seed"] == "3"
    assert _listing(tmp_path) == ["x.png"]  # no temporary file left


@pytest.mark.parametrize("command", ["img2img", "upscale"])
def test_the_output_is_never_the_input_without_overwrite(image_file, capsys, no_model, command):
    before = image_file.read_bytes()
    code, _, err = _run(capsys, command, str(image_file), "a cat", "--steps", "1", "-o", str(image_file))
    assert code == 2
    line = _one_error_line(err, command)
    assert "is the input image" in line and "--overwrite to replace it" in line
    assert image_file.read_bytes() == before


def test_the_output_is_never_the_from_png_file(tmp_path, capsys, no_model):
    source = save_png(Image.new("RGB", (16, 16)), tmp_path / "a.png", "a cat\nSteps: 1, Seed: 2, Size: 16x16")
    before = source.read_bytes()
    code, _, err = _run(capsys, "generate", "--from-png", str(source), "-o", str(tmp_path / "." / "a.png"))
    assert code == 2 and "is the input image" in _one_error_line(err)
    assert source.read_bytes() == before


def test_the_output_is_never_the_mask_and_overwrite_allows_the_input(image_file, capsys):
    mask = image_file.parent / "mask.png"
    before = mask.read_bytes()
    code, _, err = _run(capsys, "inpaint", str(image_file), str(mask), *FAST[:4], "-o", str(mask))
    assert code == 2 and "is the input image" in _one_error_line(err, "inpaint")
    assert mask.read_bytes() == before
    # asked for: img2img in.png -o in.png --overwrite replaces the input (it was read before)
    code, _, err = _run(capsys, "img2img", str(image_file), *FAST[:4], "--seed", "1", "--overwrite",
                        "-o", str(image_file))
    assert code == 0, err
    assert parse_parameters(read_png_parameters(image_file))[2]["Denoising strength"] == "0.75"


def test_numbered_files_of_a_png_out_take_fresh_numbers(tmp_path, capsys):
    target = tmp_path / "y.png"
    assert _run(capsys, "generate", "a", *FAST, "--seed", "5", "--n", "2", "-o", str(target))[0] == 0
    first = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert sorted(first) == ["grid-y-00-5.png", "y-00-5.png", "y-01-6.png"]
    code, out, _ = _run(capsys, "generate", "b", *FAST, "--seed", "5", "--n", "2", "-o", str(target))
    assert code == 0
    assert out.split() == [str(tmp_path / n) for n in ("y-02-5.png", "y-03-6.png", "grid-y-02-5.png")]
    assert all((tmp_path / name).read_bytes() == data for name, data in first.items())  # untouched


def test_folder_numbering_skips_stale_grids_and_keeps_them(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "grid-00003-9.png").write_text("a grid whose images were deleted")
    code, stdout, err = _run(capsys, "generate", "a", *FAST, "--seed", "1", "--n", "2", "-o", str(out))
    assert code == 0, err
    assert stdout.split() == [str(out / n) for n in ("00004-1.png", "00005-2.png", "grid-00004-1.png")]
    assert (out / "grid-00003-9.png").read_text() == "a grid whose images were deleted"


def test_a_file_that_appears_during_the_run_is_kept(tmp_path, capsys, monkeypatch):
    """The check before the run is not enough: the target is created without replacing."""
    import daguerre.pipelines.txt2img as txt2img_module

    real = txt2img_module.txt2img
    single, folder = tmp_path / "x.png", tmp_path / "out"

    def txt2img_then_someone_writes(*args, **kwargs):
        results = real(*args, **kwargs)
        single.write_text("written by someone else meanwhile")
        folder.mkdir(exist_ok=True)
        (folder / "00000-4.png").write_text("another run took this number")
        return results

    monkeypatch.setattr(txt2img_module, "txt2img", txt2img_then_someone_writes)
    code, _, err = _run(capsys, "generate", "a", *FAST, "--seed", "4", "-o", str(single))
    assert code == 2 and "appeared while the image was being made" in _one_error_line(err)
    assert single.read_text() == "written by someone else meanwhile"

    code, stdout, err = _run(capsys, "generate", "a", *FAST, "--seed", "4", "-o", str(folder))
    assert code == 0, err
    assert stdout.split() == [str(folder / "00001-4.png")]
    assert (folder / "00000-4.png").read_text() == "another run took this number"
    assert not [p for p in tmp_path.rglob("*") if fileio._TMP_MARK in p.name]


def test_create_without_replacing_is_atomic(tmp_path):
    """fileio: replace=False never clobbers, even a file that appears after the temporary was written."""
    target = tmp_path / "a.txt"
    fileio.atomic_write_text(target, "first", replace=False)
    with pytest.raises(FileExistsError):
        fileio.atomic_write_text(target, "second", replace=False)
    with pytest.raises(FileExistsError), fileio.atomic_path(tmp_path / "b.txt", replace=False) as tmp:
        tmp.write_text("mine")
        (tmp_path / "b.txt").write_text("theirs")
    assert target.read_text() == "first" and (tmp_path / "b.txt").read_text() == "theirs"
    assert _listing(tmp_path) == ["a.txt", "b.txt"]


def test_create_without_replacing_without_hard_links(tmp_path, monkeypatch):
    """On a file system without hard links (FAT: EPERM) the name is claimed with O_EXCL instead."""
    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    fileio.atomic_write_text(tmp_path / "a.txt", "first", replace=False)
    with pytest.raises(FileExistsError):
        fileio.atomic_write_text(tmp_path / "a.txt", "second", replace=False)
    assert (tmp_path / "a.txt").read_text() == "first" and _listing(tmp_path) == ["a.txt"]


# --- read-only, full or impossible output folders: one line, nothing lost ------------------------------

@pytest.mark.parametrize("argv", [
    ["generate", "a", *FAST],
    ["img2img", "{image}", *FAST[:4]],
    ["upscale", "{image}", *FAST[:4]],
    ["inpaint", "{image}", "{mask}", *FAST[:4]],
])
@pytest.mark.parametrize("out", ["{blocker}/sub/x.png", "{blocker}/sub"])
def test_an_output_folder_under_a_file_is_one_line_before_model_work(tmp_path, capsys, no_model, image_file,
                                                                       argv, out):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    names = {"image": image_file, "mask": image_file.parent / "mask.png", "blocker": blocker}
    argv = [a.format(**names) for a in argv]
    code, _, err = _run(capsys, *argv, "-o", out.format(**names))
    assert code == 2
    assert f"{blocker} is a file, not a folder" in _one_error_line(err, argv[0])


def _read_only(monkeypatch, folder):
    """Creating a file in `folder` fails as on a read-only file system."""
    real = fileio._new_file

    def new_file(path):
        if os.path.dirname(os.path.abspath(path)) == os.path.abspath(folder):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        real(path)

    monkeypatch.setattr(fileio, "_new_file", new_file)


@pytest.mark.parametrize("argv, command", [
    (["generate", "a", *FAST, "-o", "{ro}/x.png"], "generate"),
    (["generate", "a", *FAST, "-o", "{ro}/new/sub"], "generate"),
    (["img2img", "{image}", *FAST[:4], "-o", "{ro}"], "img2img"),
    (["convert", "{image}", "{ro}/m.safetensors"], "convert"),  # the folder is checked before SRC is read
    (["eval", "--model", "random:tiny", "--dataset", "shapes", "--out", "{ro}"], "eval"),
    (["classifier", "train", "--dataset", "shapes", "--steps", "1", "--out", "{ro}/c.safetensors"], "classifier"),
])
def test_a_read_only_folder_is_one_line_naming_it_before_model_work(tmp_path, capsys, monkeypatch, no_model,
                                                                    image_file, argv, command):
    ro = tmp_path / "ro"
    ro.mkdir()
    _read_only(monkeypatch, ro)
    argv = [a.format(ro=ro, image=image_file) for a in argv]
    code, out, err = _run(capsys, *argv)
    assert code == 2 and out == ""
    line = _one_error_line(err, command)
    assert str(ro) in line and "Read-only file system" in line and "[Errno" not in line
    assert _listing(ro) == []


def test_a_full_disk_mid_run_is_one_line_and_keeps_what_was_written(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    real, calls = fileio._fsync_file, []

    def fsync_until_full(path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path)

    monkeypatch.setattr(fileio, "_fsync_file", fsync_until_full)
    code, stdout, err = _run(capsys, "generate", "a", *FAST, "--seed", "1", "--n", "2", "-o", str(out))
    assert code == 2
    line = _one_error_line(err)
    assert f"cannot write 00001-2.png in folder {out}: No space left on device" in line
    assert stdout.split() == [str(out / "00000-1.png")]  # the first image was written, and said so
    assert _listing(out) == ["00000-1.png"]  # and kept; no temporary file left
    assert parse_parameters(read_png_parameters(out / "00000-1.png"))[2]["Seed"] == "1"


def test_os_errors_that_may_be_bugs_keep_their_traceback(monkeypatch):
    import daguerre.commands.generate as generate

    for error in (OSError(errno.EBADF, "Bad file descriptor"), OSError("no errno")):
        def fail(args, error=error):
            raise error

        monkeypatch.setattr(generate, "resolve_settings", fail)
        with pytest.raises(OSError) as caught:
            main(["generate", "a", "--model", "random:tiny"])
        assert caught.value is error


def test_save_png_without_replace(tmp_path):
    image = Image.new("RGB", (8, 8), "red")
    path = save_png(image, tmp_path / "a.png", "a\nSteps: 1, Seed: 2, Size: 8x8", replace=False)
    with pytest.raises(FileExistsError):
        save_png(Image.new("RGB", (8, 8), "blue"), path, replace=False)
    with Image.open(path) as im:
        assert im.getpixel((0, 0)) == (255, 0, 0)



def test_save_safetensors_without_replace(tmp_path):
    """`replace=False` keeps an existing file (explain attention's maps.safetensors without --overwrite)."""
    import torch
    from safetensors.torch import load_file

    path = tmp_path / "maps.safetensors"
    fileio.atomic_save_safetensors({"a": torch.ones(2)}, path, replace=False)
    with pytest.raises(FileExistsError):
        fileio.atomic_save_safetensors({"a": torch.zeros(2)}, path, replace=False)
    assert torch.equal(load_file(str(path))["a"], torch.ones(2))
    fileio.atomic_save_safetensors({"a": torch.zeros(2)}, path)  # replace: the default
    assert torch.equal(load_file(str(path))["a"], torch.zeros(2))
    assert [f.name for f in tmp_path.iterdir()] == ["maps.safetensors"]  # no temporary file left

# --- progress, seed, limits ----------------------------------------------------------------------------

def test_progress_reaches_its_total_with_batches(tmp_path, capsys, monkeypatch):
    import tqdm

    bars = []

    class Recording(tqdm.tqdm):
        def close(self):
            bars.append((self.n, self.total))
            super().close()

    monkeypatch.setattr(tqdm, "tqdm", Recording)
    code, _, err = _run(capsys, "generate", "a", *FAST, "--n", "4", "--batch-size", "2", "--steps", "3",
                        "-o", str(tmp_path))
    assert code == 0, err
    assert bars and set(bars) == {(6, 6)}  # 2 batches x 3 steps, not 4 images x 3 steps


@pytest.mark.parametrize("argv", [["generate", "a"], ["img2img", "{image}"], ["upscale", "{image}"],
                                  ["inpaint", "{image}", "{mask}"]])
def test_a_random_seed_is_told(tmp_path, capsys, image_file, argv):
    argv = [a.format(image=image_file, mask=image_file.parent / "mask.png") for a in argv]
    out = tmp_path / "o.png"
    code, _, err = _run(capsys, *argv, *FAST[:4], "-o", str(out))
    assert code == 0, err
    told = [line for line in err.splitlines() if line.startswith(f"daguerre {argv[0]}: seed ")]
    assert len(told) == 1
    assert told[0].split()[-1] == parse_parameters(read_png_parameters(out))[2]["Seed"]


def test_seeds_of_several_images_are_told(tmp_path, capsys):
    code, _, err = _run(capsys, "generate", "a", *FAST, "--seed", "7", "--n", "3", "-o", str(tmp_path))
    assert code == 0 and "daguerre generate: seeds 7 to 9 (image i: seed + i)" in err


def test_a_huge_size_is_refused_in_one_line_before_loading_a_model(tmp_path, capsys, no_model):
    code, _, err = _run(capsys, "generate", "a", "--size", "100000x100000", "-o", str(tmp_path / "x.png"))
    assert code == 2
    assert "size 100000x100000" in _one_error_line(err) and "--max-pixels" in err
    code, _, err = _run(capsys, "generate", "a", "--n", "101", "-o", str(tmp_path / "x.png"))
    assert code == 2 and "--max-images" in _one_error_line(err)


@pytest.mark.parametrize("argv, flag", [
    (["generate", "a", *FAST, "--max-pixels", "200"], "--max-pixels"),
    (["generate", "a", *FAST, "--max-steps", "1"], "--max-steps"),
    (["generate", "a", *FAST, "--max-work", "1e-9"], "--max-work"),
    (["img2img", "{image}", *FAST[:4], "--max-pixels", "200"], "--max-pixels"),
    (["inpaint", "{image}", "{mask}", *FAST[:4], "--max-batch-pixels", "200"], "--max-batch-pixels"),
    (["upscale", "{image}", *FAST[:4], "--max-pixels", "600"], "--max-pixels"),
])
def test_the_limit_flags_reach_every_image_command(tmp_path, capsys, image_file, argv, flag):
    argv = [a.format(image=image_file, mask=image_file.parent / "mask.png") for a in argv]
    out = tmp_path / "o.png"
    code, _, err = _run(capsys, *argv, "-o", str(out))
    assert code == 2 and flag in _one_error_line(err, argv[0])
    assert not out.exists()


def test_raised_limits_hold_through_the_pipeline(tmp_path, capsys):
    """The pipelines validate their request again: a request validated under raised limits keeps them
    (GenerationRequest.limits) instead of meeting DEFAULT_LIMITS there."""
    argv = ["generate", "a", *FAST[:2], "--steps", "1", "--size", "16x16", "--n", "101", "--batch-size", "101",
            "--no-grid", "-o", str(tmp_path)]
    code, _, err = _run(capsys, *argv)
    assert code == 2 and "--max-images" in _one_error_line(err)
    code, stdout, err = _run(capsys, *argv, "--max-images", "200")
    assert code == 0, err
    assert len(stdout.split()) == 101 and len(list(tmp_path.glob("*.png"))) == 101


def test_a_validated_request_keeps_its_limits():
    from daguerre.limits import DEFAULT_LIMITS, LimitError, Limits
    from daguerre.pipelines.common import progress_total
    from daguerre.pipelines.request import GenerationRequest
    from daguerre.pipelines.txt2img import txt2img
    from daguerre.registry import open_model

    comps, _ = open_model("random:tiny")
    n = DEFAULT_LIMITS.max_images + 1
    request = GenerationRequest(steps=1, width=16, height=16, n=n, batch_size=n, seed=1)
    with pytest.raises(LimitError):
        request.validate(comps.config)
    raised = Limits(max_images=n)
    valid = request.validate(comps.config, raised)
    assert valid.limits == raised
    assert progress_total(valid) == 1 and len(txt2img(comps, valid)) == n  # no DEFAULT_LIMITS inside
    with pytest.raises(LimitError):  # the request's own limits apply when the caller gives none
        GenerationRequest(steps=1, width=16, height=16, n=3, limits=Limits(max_images=2)).validate(comps.config)
    with pytest.raises(ValueError, match="limits must be"):
        request.validate(comps.config, {"max_images": n})


def test_eval_and_classifier_keep_earlier_outputs(tmp_path, capsys, no_model):
    ev = tmp_path / "ev"
    ev.mkdir()
    (ev / "report.json").write_text("{}")
    code, _, err = _run(capsys, "eval", "--model", "random:tiny", "--dataset", "shapes", "--out", str(ev))
    assert code == 2 and "--overwrite to replace it" in _one_error_line(err, "eval")
    assert (ev / "report.json").read_text() == "{}"
    clf = tmp_path / "c.safetensors"
    clf.write_text("a classifier")
    code, _, err = _run(capsys, "classifier", "train", "--dataset", "shapes", "--steps", "1", "--out", str(clf))
    assert code == 2 and "--overwrite to replace it" in _one_error_line(err, "classifier")
    assert clf.read_text() == "a classifier"
