"""Fleet messages are data: one schema, values rebuilt from what was parsed,
and no message or key can stop the subscriber."""

import json
import time

import pytest

from portsentinel.fleet import BadMessage, Fleet, read_message

NOW = float(int(time.time()))  # the subscriber checks against the real clock
DAY = 86400.0


def ban(**fields) -> str:
    return json.dumps({"type": "ban", "address": "198.51.100.7", "origin": "web-1",
                       "since": NOW - 1, "until": NOW + DAY, "reason": "SYN scan",
                       "port": 22, "protocol": "tcp", **fields})


def test_a_good_ban_is_rebuilt_from_parsed_values():
    message = read_message(ban(address="::ffff:198.51.100.7", extra="ignored"), NOW, 30 * DAY)
    assert message == {"type": "ban", "address": "198.51.100.7", "origin": "web-1",
                       "until": NOW + DAY, "since": NOW - 1, "sent": None,
                       "reason": "SYN scan", "port": 22, "protocol": "tcp", "evidence": None}


def test_a_ban_keeps_its_members_evidence_grade_only_if_it_is_one():
    assert read_message(ban(evidence="handshake"), NOW, 30 * DAY)["evidence"] == "handshake"
    for hostile in ("certain", ["single"], 1, "single\n"):
        assert read_message(ban(evidence=hostile), NOW, 30 * DAY)["evidence"] is None


@pytest.mark.parametrize("raw, reason", [
    ("1", "not an object"), ("null", "not an object"), ("[]", "not an object"),
    ('"ban"', "not an object"), ("{", "not JSON"), (b"\xff\xfe", "not UTF-8"),
    (ban(address="2001:db8::5%\nALL: ALL"), "bad address"),
    (ban(address="2001:db8::5%eth0"), "bad address"),
    (ban(address="198.51.100.7\n"), "bad address"),
    (ban(address=["198.51.100.7"]), "bad address"),
    (ban(address=None), "bad address"),
    (ban(origin=["a"]), "bad origin"), (ban(origin="a\nb"), "bad origin"),
    (ban(origin=""), "bad origin"), (ban(origin="x" * 65), "bad origin"),
    (ban(type="reboot"), "unknown type"),
    ('{"type": "ban", "address": "198.51.100.7", "origin": "a", "until": Infinity}', "not JSON"),
    ('{"type": "ban", "address": "198.51.100.7", "origin": "a", "until": NaN}', "not JSON"),
    (ban(until="tomorrow"), "bad until"), (ban(until=True), "bad until"),
    (ban(until=1e300), "bad until"), (ban(until=NOW - 5), "expired"),
    (ban(since=-1), "bad since"),
    (b"{" + b" " * 5000 + b"}", "too large"),
])
def test_hostile_messages_are_refused_with_a_reason(raw, reason):
    with pytest.raises(BadMessage) as refused:
        read_message(raw, NOW, 30 * DAY)
    assert refused.value.reason == reason


def test_until_far_in_the_future_is_capped_at_ban_time_max():
    message = read_message(ban(until=NOW + 365 * DAY), NOW, 30 * DAY)
    assert message["until"] == NOW + 30 * DAY


def test_text_fields_lose_control_characters_and_are_bounded():
    message = read_message(ban(reason="scan\n attackalert: forged\x1b[2J" + "x" * 500,
                               port=70000, protocol="icmp\n"), NOW, 30 * DAY)
    assert "\n" not in message["reason"] and "\x1b" not in message["reason"]
    assert len(message["reason"]) == 200
    assert message["port"] is None and message["protocol"] is None


def test_unban_needs_only_a_valid_address_and_origin():
    assert read_message('{"type": "unban", "address": "2001:db8::5", "origin": "b"}', NOW,
                        DAY) == {"type": "unban", "address": "2001:db8::5", "origin": "b"}
    with pytest.raises(BadMessage):
        read_message('{"type": "unban", "address": "2001:db8::5%\\nALL", "origin": "b"}',
                     NOW, DAY)


def test_the_subscriber_survives_anything_and_counts_it():
    applied, lifted, rejected, errors = [], [], [], []
    fleet = Fleet("redis://localhost", "me", "p", applied.append, lifted.append, list,
                  print, errors.append, max_seconds=DAY, rejected=rejected.append)
    for raw in ("1", "null", "[]", ban(address="2001:db8::5%\nALL: ALL"), b"\xff",
                ban(origin="me"), ban(), '{"type": "unban", "address": "198.51.100.9", '
                '"origin": "web-2"}'):
        fleet._receive(raw)
    assert [m["address"] for m in applied] == ["198.51.100.7"]
    assert [m["address"] for m in lifted] == ["198.51.100.9"]
    assert rejected == ["not an object"] * 3 + ["bad address", "not UTF-8"]
    assert len(errors) == 1  # logged at most once a second, counted always

    def broken(message):
        raise RuntimeError("a bug downstream")
    fleet.apply = broken
    fleet._receive(ban(address="198.51.100.8"))
    assert rejected[-1] == "not applied"


def test_a_key_of_the_wrong_type_does_not_stop_the_resync():
    import redis

    class Client:
        def scan_iter(self, match, count):
            return [b"p:ban:198.51.100.1", b"p:ban:junk", b"p:ban:198.51.100.2"]

        def get(self, key):
            if key == b"p:ban:junk":
                raise redis.ResponseError("WRONGTYPE Operation against a key holding the "
                                          "wrong kind of value")
            return ban(address=key.decode().rsplit(":", 1)[1])

    applied, rejected = [], []
    fleet = Fleet("redis://localhost", "me", "p", applied.append, list, list, print,
                  lambda line: None, max_seconds=DAY, rejected=rejected.append)
    fleet._resync(Client())
    assert [m["address"] for m in applied] == ["198.51.100.1", "198.51.100.2"]
    assert rejected == ["bad key"]


def test_a_correlation_not_banned_here_leaves_the_next_member_free_to_ban():
    """The evidence script marks a source `:fired` (once a window); when the
    member that crossed the line does not ban it (its ban rate limit, log
    only, a peer of its own), the mark goes, or a spoofed flood that drained
    the rate limit would make the real sweeper immune for the window."""
    from portsentinel.fleet import Fleet

    class Client:
        deleted: list = []

        def delete(self, key):
            self.deleted.append(key)

    for banned, deleted in ((True, []), (False, ["pfx:ev:192.0.2.9:fired"])):
        fleet = Fleet("redis://192.0.2.1:6379/0", "m1", "pfx", lambda m: None,
                      lambda m: None, lambda: [], print, print, scan_trigger=3,
                      correlated=lambda address, entries, result=banned: result)
        fleet._script = lambda keys, args, client: [b"m1 1/tcp", b"m2 2/tcp", b"m3 3/tcp"]
        client = Client()
        client.deleted = []
        fleet._evidence(client, {"address": "192.0.2.9", "entry": "m1 1/tcp"})
        assert client.deleted == deleted
