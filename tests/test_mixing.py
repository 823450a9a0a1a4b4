import pytest

from xpert_fl.data import load_corpus, similarity_mixture, split_roles, train_test_split, user_samples


@pytest.fixture(scope="module")
def corpus():
    return load_corpus("builtin")


@pytest.fixture(scope="module")
def roles(corpus):
    return split_roles(corpus, seed=0)


def _prompts(c):
    return {s.prompt for samples in [*c.styles.values(), c.neutral] for s in samples}


def test_roles_are_disjoint_by_prompt_and_cover_everything(corpus, roles):
    cloud, user, test = (_prompts(roles[r]) for r in ("cloud", "user", "test"))
    assert not (cloud & user) and not (cloud & test) and not (user & test)
    assert cloud | user | test == _prompts(corpus)
    assert abs(len(cloud) / len(_prompts(corpus)) - 0.5) < 0.02


def test_plain_corpus_roles_are_disjoint_by_sample():
    plain = load_corpus("builtin-plain")
    parts = split_roles(plain, seed=1)
    for style in plain.styles:
        texts = [{s.response for s in parts[r].styles[style]} for r in ("cloud", "user", "test")]
        assert sum(map(len, texts)) == len(plain.styles[style])
        assert not (texts[0] & texts[1]) and not (texts[1] & texts[2]) and not (texts[0] & texts[2])


def test_split_is_deterministic_and_seed_dependent(corpus):
    a, b, c = split_roles(corpus, seed=3), split_roles(corpus, seed=3), split_roles(corpus, seed=4)
    assert a["test"].neutral == b["test"].neutral
    assert a["test"].neutral != c["test"].neutral


@pytest.mark.parametrize("similarity", [0.0, 0.3, 0.5, 0.7, 0.9, 1.0])
def test_mixture_ratio(roles, similarity):
    cloud = roles["cloud"]
    mix = similarity_mixture(cloud, "poetic", similarity, n=40, seed=0)
    poetic = {s.response for s in cloud.styles["poetic"]}
    n_styled = sum(s.response in poetic for s in mix)
    assert len(mix) == 40 and n_styled == round(similarity * 40)
    assert len({s.prompt for s in mix}) == 40, "a prompt appears twice in one mixture"


def test_mixture_is_deterministic(roles):
    cloud = roles["cloud"]
    assert similarity_mixture(cloud, "expert", 0.7, seed=1) == similarity_mixture(cloud, "expert", 0.7, seed=1)
    assert similarity_mixture(cloud, "expert", 0.7, seed=1) != similarity_mixture(cloud, "expert", 0.7, seed=2)


def test_bad_mixture_arguments(roles):
    with pytest.raises(ValueError, match="similarity"):
        similarity_mixture(roles["cloud"], "expert", 1.5)
    with pytest.raises(KeyError, match="klingon"):
        similarity_mixture(roles["cloud"], "klingon", 0.5)


def test_users_get_disjoint_samples(roles):
    pool = roles["user"]
    u0, u1 = user_samples(pool, "sarcastic", 12, user_index=0), user_samples(pool, "sarcastic", 12, user_index=1)
    assert not ({s.response for s in u0} & {s.response for s in u1})
    with pytest.raises(ValueError, match="not enough"):
        user_samples(pool, "sarcastic", 12, user_index=10)


def test_user_mixture_of_two_styles(roles):
    data = user_samples(roles["user"], {"poetic": 0.5, "expert": 0.5}, 10)
    poetic = {s.response for s in roles["user"].styles["poetic"]}
    assert sum(s.response in poetic for s in data) == 5


def test_train_test_split_is_disjoint(roles):
    data = user_samples(roles["user"], "friendly", 20)
    train, test = train_test_split(data, 0.25, seed=0)
    assert len(test) == 5 and len(train) == 15
    assert not ({s.response for s in train} & {s.response for s in test})
