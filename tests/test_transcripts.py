"""A session's history is a transcript: ids, times, usage, attention and settings."""

from datetime import datetime

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
