"""The local Hub (tests/hub_server.py) serves the real huggingface_hub, timm and datasets clients."""

import json

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors.torch import save_file

@pytest.fixture
def model_dir(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architecture": "tiny", "num_classes": 3}))
    save_file({"weight": torch.arange(12, dtype=torch.float32).reshape(3, 4)}, folder / "model.safetensors")
    return folder


@pytest.fixture
def pushed_model(hub_server, model_dir):
    repo_id = hub_server.unique_repo_id("model")
    api = HfApi()
    api.create_repo(repo_id)
    api.upload_folder(repo_id=repo_id, folder_path=model_dir, commit_message="Add model")
    return repo_id


def test_upload_folder_then_download_gives_the_same_bytes(hub_server, pushed_model, model_dir):
    for name in ("config.json", "model.safetensors"):
        assert open(hf_hub_download(pushed_model, name), "rb").read() == (model_dir / name).read_bytes()
    assert hub_server.lfs_files("model", pushed_model) == {"model.safetensors"}
    snapshot = snapshot_download(pushed_model)
    assert (model_dir / "config.json").read_bytes() == open(f"{snapshot}/config.json", "rb").read()


def test_model_info_and_tree_list_the_files(hub_server, pushed_model):
    info = HfApi().model_info(pushed_model, files_metadata=True)
    siblings = {s.rfilename: s for s in info.siblings}
    assert set(siblings) == {".gitattributes", "config.json", "model.safetensors"}
    assert siblings["model.safetensors"].lfs is not None
    assert info.sha == hub_server.commits("model", pushed_model)[0].oid

    tree = {entry.path: entry for entry in HfApi().list_repo_tree(pushed_model)}
    assert set(tree) == set(siblings)
    assert tree["model.safetensors"].lfs.size == tree["model.safetensors"].size
    assert tree["config.json"].lfs is None


def test_missing_file_and_missing_repo_raise_the_clients_typed_errors(hub_server, pushed_model):
    api = HfApi()
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(pushed_model, "missing.json")
    with pytest.raises(RemoteEntryNotFoundError):
        list(api.list_repo_tree(pushed_model, path_in_repo="missing"))
    assert not api.file_exists(pushed_model, "missing.json")
    assert api.file_exists(pushed_model, "config.json")

    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/no-such-repo", "config.json")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/no-such-repo")
    assert not api.repo_exists("org/no-such-repo")
    assert api.repo_exists(pushed_model)
    with pytest.raises(RevisionNotFoundError):
        api.model_info(pushed_model, revision="no-such-branch")


def test_each_push_is_one_commit_and_an_unchanged_push_is_none(hub_server, pushed_model, model_dir):
    api = HfApi()
    api.upload_folder(repo_id=pushed_model, folder_path=model_dir)  # nothing changed
    (model_dir / "config.json").write_text(json.dumps({"architecture": "tiny", "num_classes": 4}))
    api.upload_folder(repo_id=pushed_model, folder_path=model_dir, commit_message="Change config")

    commits = hub_server.commits("model", pushed_model)
    assert [c.title for c in commits] == ["Change config", "Add model", "initial commit"]
    assert [c.commit_id for c in api.list_repo_commits(pushed_model)] == [c.oid for c in commits]
    assert json.loads(hub_server.files("model", pushed_model)["config.json"])["num_classes"] == 4


def test_create_pr_and_branches_are_separate_revisions(hub_server, pushed_model):
    api = HfApi()
    pr = api.upload_file(path_or_fileobj=b"pr", path_in_repo="pr.txt", repo_id=pushed_model, create_pr=True)
    assert pr.pr_revision == "refs/pr/1"
    api.create_branch(pushed_model, branch="dev")
    api.upload_file(path_or_fileobj=b"dev", path_in_repo="dev.txt", repo_id=pushed_model, revision="dev")

    assert "pr.txt" in api.list_repo_files(pushed_model, revision=pr.pr_revision)
    assert "dev.txt" in api.list_repo_files(pushed_model, revision="dev")
    assert {"pr.txt", "dev.txt"}.isdisjoint(api.list_repo_files(pushed_model))
    assert open(hf_hub_download(pushed_model, "dev.txt", revision="dev"), "rb").read() == b"dev"
    with pytest.raises(RevisionNotFoundError):
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=pushed_model, revision="nope")


def test_timm_loads_a_pushed_model_with_identical_logits(hub_server, tmp_path):
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=3).eval()
    save_for_hf(model, tmp_path / "export", safe_serialization=True)
    repo_id = hub_server.unique_repo_id("timm")
    api = HfApi()
    api.create_repo(repo_id)
    api.upload_folder(repo_id=repo_id, folder_path=tmp_path / "export")

    loaded = timm.create_model(f"hf-hub:{repo_id}", pretrained=True).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))


def test_datasets_loads_a_pushed_parquet_dataset(hub_server, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "data").mkdir()
    table = pa.table({"x": list(range(10)), "label": [i % 3 for i in range(10)]})
    pq.write_table(table, tmp_path / "data" / "train-00000-of-00001.parquet")
    repo_id = hub_server.unique_repo_id("dataset")
    api = HfApi()
    api.create_repo(repo_id, repo_type="dataset")
    api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=tmp_path)
    assert api.dataset_info(repo_id).siblings

    loaded = datasets.load_dataset(repo_id, split="train")
    assert loaded.to_dict() == table.to_pydict()
    assert hub_server.unhandled == []


def test_validate_yaml_accepts_good_metadata_and_rejects_bad(hub_server):
    good = "---\nlicense: apache-2.0\ntags: [timm]\n---\n# Model\n"
    ModelCard(good).validate()
    repo_id = hub_server.unique_repo_id("card")
    api = HfApi()
    api.create_repo(repo_id)
    api.upload_file(path_or_fileobj=good.encode(), path_in_repo="README.md", repo_id=repo_id)
    assert api.model_info(repo_id).card_data["license"] == "apache-2.0"

    commits_before = len(hub_server.commits("model", repo_id))
    with pytest.raises(ValueError, match="Invalid metadata"):
        api.upload_file(path_or_fileobj=b"---\ntags: [unclosed\n---\n", path_in_repo="README.md", repo_id=repo_id)
    assert len(hub_server.commits("model", repo_id)) == commits_before

    with pytest.warns(UserWarning, match="missing yaml metadata"):
        api.upload_file(path_or_fileobj=b"# No metadata\n", path_in_repo="README.md", repo_id=repo_id)


def test_rejected_token_is_a_401_http_error_not_a_missing_repo(hub_server, pushed_model):
    hub_server.rejected_tokens.add(hub_server.token)
    with pytest.raises(HfHubHTTPError) as raised:
        HfApi().model_info(pushed_model)
    assert raised.value.response.status_code == 401
    assert not isinstance(raised.value, RepositoryNotFoundError)


def test_writes_need_a_token_and_write_rights(hub_server, pushed_model):
    api = HfApi()
    with pytest.raises(HfHubHTTPError) as raised:
        api.create_repo(hub_server.unique_repo_id("anonymous"), token=False)
    assert raised.value.response.status_code == 401

    hub_server.read_only_repos.add(("model", pushed_model))
    with pytest.raises(HfHubHTTPError) as raised:
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=pushed_model)
    assert raised.value.response.status_code == 403
    assert open(hf_hub_download(pushed_model, "config.json"), "rb").read()  # still readable


def test_create_repo_without_namespace_uses_the_token_owner(hub_server):
    name = hub_server.unique_repo_id("solo").split("/")[1]
    url = HfApi().create_repo(name)
    assert url.repo_id == f"{hub_server.user}/{name}"
    assert hub_server.repo_exists("model", url.repo_id)


def test_private_repo_needs_a_token_to_read(hub_server):
    repo_id = hub_server.unique_repo_id("private")
    api = HfApi()
    api.create_repo(repo_id, private=True)
    assert api.model_info(repo_id).private
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(repo_id, token=False)


def test_token_travels_only_in_the_authorization_header(hub_server, model_dir):
    repo_id = hub_server.unique_repo_id("token")
    api = HfApi()
    api.create_repo(repo_id)
    api.upload_folder(repo_id=repo_id, folder_path=model_dir)
    hf_hub_download(repo_id, "model.safetensors", force_download=True)

    assert hub_server.requests
    for request in hub_server.requests:
        assert hub_server.token not in request.path
        others = {k: v for k, v in request.headers.items() if k != "authorization"}
        assert hub_server.token not in json.dumps(others)
    lfs_puts = [r for r in hub_server.requests if r.method == "PUT"]
    assert lfs_puts and all("authorization" not in r.headers for r in lfs_puts)
    commit = next(r for r in hub_server.requests if "/commit/" in r.path)
    assert commit.headers["authorization"] == f"Bearer {hub_server.token}"


def test_hub_env_points_subprocesses_at_the_local_hub(hub_server):
    from conftest import hub_env

    env = hub_env()
    assert env["HF_ENDPOINT"] == hub_server.url
    assert env["HF_TOKEN"] == hub_server.token
    assert env["HF_HUB_DISABLE_XET"] == "1"
    assert "HF_HUB_OFFLINE" not in env


# --- injected faults: what the client meets when the network fails ---------------------------


def test_a_500_on_the_commit_fails_that_commit_only(hub_server, pushed_model):
    from hub_server import COMMIT

    fault = hub_server.fail("POST", COMMIT, status=500)
    api = HfApi()
    with pytest.raises(HfHubHTTPError) as raised:
        api.upload_file(path_or_fileobj=b"one", path_in_repo="one.txt", repo_id=pushed_model)
    assert raised.value.response.status_code == 500 and fault.hits == 1
    assert "one.txt" not in hub_server.files("model", pushed_model)
    api.upload_file(path_or_fileobj=b"one", path_in_repo="one.txt", repo_id=pushed_model)  # times=1: spent
    assert hub_server.files("model", pushed_model)["one.txt"] == b"one" and fault.hits == 1


def test_a_429_carries_retry_after_and_always_means_every_time(hub_server, pushed_model):
    from hub_server import COMMIT

    fault = hub_server.fail("POST", COMMIT, status=429, retry_after=7, times=None)
    for _ in range(2):
        with pytest.raises(HfHubHTTPError) as raised:
            HfApi().upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=pushed_model)
        assert raised.value.response.status_code == 429
        assert raised.value.response.headers["Retry-After"] == "7"
    assert fault.hits == 2 and len(hub_server.commits("model", pushed_model)) == 2


def test_a_dropped_commit_is_a_transport_error_and_no_commit(hub_server, pushed_model):
    import httpx2
    from hub_server import COMMIT

    fault = hub_server.drop("POST", COMMIT, after=0.5)
    with pytest.raises(httpx2.TransportError):
        HfApi().upload_file(path_or_fileobj=b"x" * 1000, path_in_repo="x.txt", repo_id=pushed_model)
    assert fault.hits == 1 and "x.txt" not in hub_server.files("model", pushed_model)


def test_a_dropped_lfs_upload_is_sent_again_by_the_client(hub_server, pushed_model, tmp_path):
    from hub_server import LFS_UPLOAD

    fault = hub_server.drop("PUT", LFS_UPLOAD, after=100)
    weights = {"weight": torch.arange(4096, dtype=torch.float32)}
    save_file(weights, tmp_path / "big.safetensors")
    hub_server.clear_log()
    HfApi().upload_file(path_or_fileobj=tmp_path / "big.safetensors", path_in_repo="big.safetensors",
                        repo_id=pushed_model)  # huggingface_hub's http_backoff retries the PUT
    assert fault.hits == 1 and len([r for r in hub_server.requests if r.method == "PUT"]) == 2
    assert hub_server.files("model", pushed_model)["big.safetensors"] == (tmp_path / "big.safetensors").read_bytes()


def test_a_cut_download_is_fetched_again_and_whole(hub_server, pushed_model, model_dir, tmp_path):
    from hub_server import RESOLVE

    fault = hub_server.cut("GET", RESOLVE + "main/model.safetensors$", after=0.5)
    path = hf_hub_download(pushed_model, "model.safetensors", cache_dir=tmp_path / "cache")
    assert open(path, "rb").read() == (model_dir / "model.safetensors").read_bytes()
    assert fault.hits == 1
    # the client asks again; below its 10 MiB read size the cut part never reached the file, so
    # it asks from the start (a larger file resumes with a Range request)
    gets = [r for r in hub_server.requests if r.method == "GET" and r.path.endswith("/model.safetensors")]
    assert len(gets) == 2


def test_a_slow_answer_still_arrives(hub_server, pushed_model):
    fault = hub_server.slow("GET", r"^/api/models/", seconds=0.2)
    assert HfApi().model_info(pushed_model).sha == hub_server.commits("model", pushed_model)[0].oid
    assert fault.hits == 1
