import os
import subprocess
import sys


def run_chat(stdin: str, cwd, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mmchat", "chat", "--untrained", *args], input=stdin,
        capture_output=True, text=True, timeout=120, cwd=cwd,
        env={"MMCHAT_MODEL__N_HIDDEN": "32", "MMCHAT_MODEL__N_EMBD": "16",
             "MMCHAT_MODEL__D_MODEL": "16", "MMCHAT_GENERATION__MAX_NEW_TOKENS": "4",
             "PATH": "/usr/bin:/bin", **env,
             # the mmchat under test, when PYTHONPATH points at a checkout
             **{k: v for k, v in os.environ.items() if k == "PYTHONPATH"}})


def test_repl_chats_with_images_and_voice_and_reports_errors(tmp_path, image_dir, speech_dir):
    script = "\n".join([
        "/help",
        "hello",
        f"/image {image_dir / 'circle.png'} what colour is the circle?",
        f"/voice {speech_dir / 'question.wav'}",
        "and this?",
        f"/image {image_dir / 'corrupt.png'} broken",
        f"/image {tmp_path / 'missing.png'}",
        "/reset",
        "/bogus",
        "still here",
        "/quit",
    ]) + "\n"
    out = run_chat(script, tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout
    assert "/image PATH [text]" in lines
    assert lines.count("bot> ") == 5
    assert "error [corrupt_media]" in lines
    assert "cannot read" in lines and "(conversation reset)" in lines
    assert "unknown command '/bogus'" in lines
    assert "attached" in lines


def test_repl_ends_cleanly_on_end_of_input(tmp_path):
    out = run_chat("hello\n", tmp_path)
    assert out.returncode == 0 and "bot> " in out.stdout


def test_attach_takes_any_installed_modality(tmp_path, image_dir, speech_dir):
    import os
    from pathlib import Path

    toy = Path(__file__).parent / "toy_plugin.py"
    (tmp_path / "config.toml").write_text(f'[plugins]\npaths = ["{toy}"]\n')
    (tmp_path / "reading.bin").write_bytes(b"abcdefgh")
    script = "\n".join([
        "/modalities",
        f"/attach {tmp_path / 'reading.bin'} toy",
        "what does it read?",
        f"/attach {image_dir / 'circle.png'}",
        "and this?",
        f"/attach {speech_dir / 'question.wav'} voice",
        "listen",
        f"/attach {image_dir / 'circle.png'} voice",
        "wrong",
        f"/attach {image_dir / 'circle.png'} nosuch",
        "/quit",
    ]) + "\n"
    out = subprocess.run(
        [sys.executable, "-m", "mmchat", "chat", "--untrained"], input=script,
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={"MMCHAT_MODEL__N_HIDDEN": "32", "MMCHAT_MODEL__N_EMBD": "16",
             "MMCHAT_MODEL__D_MODEL": "16", "MMCHAT_GENERATION__MAX_NEW_TOKENS": "4",
             "PATH": "/usr/bin:/bin", "PYTHONPATH": os.environ.get("PYTHONPATH", "")})
    assert out.returncode == 0, out.stderr
    lines = out.stdout
    assert "  toy: application/x-toy" in lines
    assert "as application/x-toy;" in lines and "as image/png;" in lines
    assert lines.count("bot> ") == 4
    assert "error [unsupported_media]: modality 'voice' does not accept 'image/png'" in lines
    assert "error: no modality 'nosuch'" in lines


def test_a_withdrawn_reply_is_followed_by_the_fallback(tmp_path):
    """No untrained reply is sure enough for a threshold of 1: each gives the fallback."""
    out = run_chat("hello\nand you?\n", tmp_path, MMCHAT_GENERATION__FALLBACK_THRESHOLD="1",
                   MMCHAT_GENERATION__FALLBACK_TEXT="i only know pictures")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count(" (withdrawn)\nbot> i only know pictures\n") == 2
