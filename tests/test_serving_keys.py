"""Who may use which adapter: API keys on `soppu serve`, over HTTP, with the clients people use."""

from __future__ import annotations

import json
import os
import stat

import pytest
import requests
from helpers import lorax_client
from test_serving_faults import live
from typer.testing import CliRunner

from soppu.cli import app
from soppu.server.serving.keys import KeysFile


@pytest.fixture(scope="module")
def guarded(served_dir):
    """The serving dir served with a keys file: a key for user01, one for user02, an admin."""
    serving, model = served_dir
    keys = KeysFile(serving / "keys.json")
    tokens = {
        "user01": keys.add("user01")[1],
        "user02": keys.add("user02")[1],
        "admin": keys.add(admin=True)[1],
    }
    with live(serving, model, keys=serving / "keys.json") as (url, _engine):
        yield url, serving, tokens, keys


@pytest.fixture(scope="module")
def served_dir(tmp_path_factory):
    from helpers import make_served

    root, model = make_served(tmp_path_factory.mktemp("keys"))
    return root / "serving", model


def bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def ask(url: str, token: str | None, adapter: str | None, route: str = "/generate"):
    headers = bearer(token)
    # The prompt's logprobs tell adapters apart where a tiny model's greedy text does not.
    parameters = {"max_new_tokens": 4, "details": True, "decoder_input_details": True}
    body = {"inputs": "To be, or not", "parameters": parameters}
    if adapter is not None:
        body["parameters"]["adapter_id"] = adapter
    return requests.post(f"{url}{route}", json=body, headers=headers, timeout=60)


def test_a_users_key_uses_their_adapter_and_no_one_elses(guarded):
    url, _serving, tokens, _ = guarded
    mine = ask(url, tokens["user01"], "user01")
    assert mine.status_code == 200, mine.text
    # No adapter named: the key's own, the same answer.
    assert ask(url, tokens["user01"], None).json() == mine.json()
    # Another user's adapter, or one that does not exist: 403, the same body either way.
    other, missing = ask(url, tokens["user01"], "user02"), ask(url, tokens["user01"], "mallory")
    assert other.status_code == missing.status_code == 403
    assert other.json() == missing.json()
    # Without a key nothing is said about adapters: a path probe gets 401, not a 404.
    probe = {"inputs": "hi", "parameters": {"adapter_id": "/etc/x", "adapter_source": "local"}}
    assert requests.post(f"{url}/generate", json=probe, timeout=60).status_code == 401
    # No key, a wrong one, a malformed one: 401 with the Bearer challenge.
    for token in (None, tokens["user01"][:-2] + "xx", "soppu_nothing", "Basic abc"):
        refused = ask(url, token, "user01")
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
    # The base model by its id (what a user scores against), for every key.
    model_id = requests.get(f"{url}/info", timeout=60).json()["model_id"]
    assert "/" not in model_id  # a local folder is named, never its path
    base = ask(url, tokens["user01"], model_id)
    assert base.status_code == 200 and base.json() != mine.json()
    # An admin key: every adapter, and the base model when none is named.
    assert ask(url, tokens["admin"], "user02").status_code == 200
    assert ask(url, tokens["admin"], None).json() == base.json()
    # GET /v1/models (what OpenAI clients call first): the base model and what the key may use.
    listed = requests.get(f"{url}/v1/models", headers=bearer(tokens["user01"]), timeout=60)
    assert [m["id"] for m in listed.json()["data"]] == [model_id, "user01"]
    everything = requests.get(f"{url}/v1/models", headers=bearer(tokens["admin"]), timeout=60)
    assert [m["id"] for m in everything.json()["data"]][1:] == [
        "user00",
        "user01",
        "user02",
        "user03",
    ]
    assert requests.get(f"{url}/v1/models", timeout=60).status_code == 401
    metrics = requests.get(f"{url}/metrics", timeout=60).text
    assert 'soppu_requests_total{route="/generate",status="403"} 2.0' in metrics
    assert 'soppu_requests_total{route="/generate",status="401"} 5.0' in metrics
    assert 'soppu_requests_total{route="/v1/models",status="401"} 1.0' in metrics


def test_keys_added_or_revoked_take_effect_while_it_runs(guarded):
    url, serving, tokens, keys = guarded
    assert ask(url, tokens["user02"], "user02").status_code == 200
    added = CliRunner().invoke(app, ["keys", "add", "user03", "--serving", str(serving)])
    assert added.exit_code == 0, added.output
    token = added.output.strip().splitlines()[-1]
    assert ask(url, token, "user03").status_code == 200
    ident = next(k.id for k in keys.entries() if k.user == "user02")
    revoked = CliRunner().invoke(app, ["keys", "revoke", ident, "--serving", str(serving)])
    assert revoked.exit_code == 0 and "user02" in revoked.output
    assert ask(url, tokens["user02"], "user02").status_code == 401
    listed = CliRunner().invoke(app, ["keys", "list", "--serving", str(serving)])
    assert "user03" in listed.output and "user02" not in listed.output
    assert (
        token not in listed.output
        and token.split("_", 2)[2] not in (serving / "keys.json").read_text()
    )


def test_the_keys_file_is_private_and_holds_no_key(tmp_path):
    keys = KeysFile(tmp_path / "keys.json")
    entry, token = keys.add("alice")
    assert stat.S_IMODE(os.stat(tmp_path / "keys.json").st_mode) == 0o600
    stored = json.loads((tmp_path / "keys.json").read_text())["keys"][0]
    assert token.split("_", 2)[2] not in json.dumps(stored)
    assert keys.check(token) == entry and keys.check(token + "x") is None
    assert keys.check(None) is None and keys.check("") is None
    with pytest.raises(ValueError, match="not both"):
        keys.add("alice", admin=True)
    with pytest.raises(ValueError, match="one user"):
        keys.add()


def test_lorax_client_and_openai_client_work_with_a_key_unchanged(guarded, tmp_path):
    from openai import OpenAI, PermissionDeniedError

    url, _, tokens, _ = guarded
    with lorax_client(tmp_path) as Client:
        headers = {"Authorization": f"Bearer {tokens['user01']}"}
        answer = Client(url, headers=headers, timeout=60).generate(
            "To be, or not", adapter_id="user01", max_new_tokens=4
        )
        assert (
            answer.generated_text == ask(url, tokens["user01"], "user01").json()["generated_text"]
        )
    client = OpenAI(base_url=f"{url}/v1", api_key=tokens["user01"])
    completion = client.completions.create(model="user01", prompt="To be", max_tokens=3)
    assert completion.usage.completion_tokens == 3
    with pytest.raises(PermissionDeniedError):
        client.completions.create(model="user02", prompt="To be", max_tokens=3)


def test_serving_beyond_loopback_needs_keys_or_saying_so(served_dir, tmp_path):
    serving, _model = served_dir
    result = CliRunner().invoke(app, ["serve", str(serving), "--host", "0.0.0.0"])
    assert result.exit_code == 2 and "--api-keys" in result.output
    assert "--insecure-no-auth" in result.output
    missing = CliRunner().invoke(
        app, ["serve", str(serving), "--api-keys", str(tmp_path / "none.json")]
    )
    assert missing.exit_code == 2 and "no keys file" in missing.output


def test_keys_commands_name_what_they_need(tmp_path):
    for args in (["keys", "list"], ["keys", "add", "alice"], ["keys", "revoke", "abc"]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2 and "--serving" in result.output, result.output
    result = CliRunner().invoke(app, ["keys", "revoke", "nope", "--serving", str(tmp_path)])
    assert result.exit_code == 2 and "no key with id 'nope'" in result.output
    result = CliRunner().invoke(app, ["keys", "add", "../evil", "--serving", str(tmp_path)])
    assert result.exit_code == 2 and not (tmp_path / "keys.json").exists()


def test_a_split_clients_hidden_states_need_a_valid_key(guarded):
    """The base model's hidden states: any valid key, none without one (the ApiFeatures a
    real split node uses sends its node's teacher-key)."""
    import torch

    from soppu import features

    url, _serving, tokens, _ = guarded
    body = {"input_ids": [[1, 2, 3]], "layer": 1}
    assert requests.post(f"{url}/v1/hidden_states", json=body, timeout=60).status_code == 401
    wrong = requests.post(f"{url}/v1/hidden_states", json=body, headers=bearer("nope"), timeout=60)
    assert wrong.status_code == 401
    ok = requests.post(
        f"{url}/v1/hidden_states", json=body, headers=bearer(tokens["user01"]), timeout=60
    )
    assert ok.status_code == 200 and ok.json()["data"][0]["shape"][0] == 3
    states = features.ApiFeatures(url, 1, tokens["admin"]).hidden_states([torch.tensor([1, 2])])
    assert states[0].shape[0] == 2
    with pytest.raises(features.FeatureError, match="401"):
        features.ApiFeatures(url, 1).hidden_states([torch.tensor([1, 2])])
