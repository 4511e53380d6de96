"""A session's history is a transcript: ids, times, usage, attention and settings."""

from datetime import datetime

import pytest

from mmchat import Attachment, Engine

TOY = Attachment(bytes(range(16)), "application/x-toy")


async def test_history_carries_ids_times_usage_attention_and_settings(tiny_config, toy_host):
    async with Engine(tiny_config, plugins=toy_host) as engine:
        first = await engine.reply("s", "hello", [TOY], strategy="sample", seed=3,
                                   temperature=0.7)
        second = await engine.reply("s", "and now?")
        turns = await engine.history("s")
    assert [t["role"] for t in turns] == ["user", "assistant"] * 2
    ids = [t["id"] for t in turns]
    assert len(set(ids)) == 4 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    times = [datetime.fromisoformat(t["time"]) for t in turns]
    assert all(t.utcoffset() is not None for t in times) and times == sorted(times)
    user, assistant = turns[0], turns[1]
    assert user["attachments"] == [{"modality": "toy", "mime_type": TOY.mime_type,
                                    "id": TOY.id}]
    assert assistant["usage"] == {"prompt_tokens": first.prompt_tokens,
                                  "completion_tokens": first.completion_tokens}
    assert assistant["attention"] == first.attention and assistant["text"] == first.text
    assert assistant["generation"]["strategy"] == "sample"
    assert assistant["generation"]["seed"] == 3
    assert assistant["generation"]["temperature"] == 0.7
    assert turns[3]["generation"]["strategy"] == "greedy"
    assert turns[3]["usage"]["completion_tokens"] == second.completion_tokens


async def test_a_session_seeded_from_a_transcript_goes_on_as_the_original():
    from mmchat.config import Config
    from mmchat.state import loads_state

    async with Engine(Config()) as engine:  # the bundled model: its replies re-tokenize
        for text in ("hello", "how are you?"):
            await engine.reply("original", text)
        transcript = await engine.history("original")
        added = await engine.seed("copy", transcript)
        assert [t["text"] for t in added] == [t["text"] for t in transcript]
        assert {t["finish_reason"] for t in added[1::2]} == {"seeded"}
        original, copy = [loads_state((await engine.store.load(s)).state)
                          for s in ("original", "copy")]
        assert copy.turns == original.turns == 2
        if transcript[-1]["finish_reason"] == "stop":  # else its last token is pending
            assert copy.pending == original.pending
            assert (copy.rnn - original.rnn).abs().max() < 1e-4
        for text in ("thank you!", "what is your name?"):
            want, got = [await engine.reply(s, text) for s in ("original", "copy")]
            assert got.text == want.text


async def test_seeding_keeps_attachments_in_memory(tiny_config, toy_host):
    import torch

    from mmchat.state import loads_entry

    async with Engine(tiny_config, plugins=toy_host) as engine:
        await engine.reply("original", "look", [TOY])
        seeded = [{"role": "user", "text": "look", "attachments": [TOY]},
                  {"role": "assistant", "text": "a toy"}]
        added = await engine.seed("copy", seeded)
        assert added[0]["attachments"] == [{"modality": "toy", "mime_type": TOY.mime_type,
                                            "id": TOY.id}]
        original, copy = [await engine.store.load(s) for s in ("original", "copy")]
        assert len(copy.memory) == len(original.memory) == 1
        seeded_entry, entry = loads_entry(copy.memory[0]), loads_entry(original.memory[0])
        assert seeded_entry.attachment_id == entry.attachment_id == TOY.id
        torch.testing.assert_close(seeded_entry.vectors, entry.vectors)
        assert (await engine.reply("copy", "and now?")).completion_tokens > 0


async def test_bad_transcripts_are_refused_by_name(tiny_config, toy_host):
    from mmchat import InputError

    user, bot = {"role": "user", "text": "hi"}, {"role": "assistant", "text": "hello"}
    async with Engine(tiny_config, plugins=toy_host) as engine:
        for turns, words in [([], "no turns"), ([user], "end with a reply"),
                             ([bot, user], "turn 0 must be"), ([user, user], "turn 1 must be"),
                             ([user, {**bot, "text": 3}], "turn 1: text"),
                             ([{**user, "attachments": [{"id": "x"}]}, bot], "Attachment")]:
            with pytest.raises(InputError, match=words):
                await engine.seed("s", turns)
        assert await engine.history("s") == []
