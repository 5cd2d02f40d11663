"""`--scrub-pii`: every kind of PII becomes its placeholder; look-alikes (versions, dates, numbers) stay."""

import pytest

from scalelm.data.clean.pii import PLACEHOLDERS, card_network, luhn_ok, scrub, scrub_counted

EMAIL, CARD, IP, PHONE = (PLACEHOLDERS[k] for k in ("email", "credit_card", "ip_address", "phone"))


@pytest.mark.parametrize("text, expected, kind", [
    ("write to jane.doe+news@example.co.uk today", f"write to {EMAIL} today", "email"),
    ("(a.b_c-9@mail-server.org)", f"({EMAIL})", "email"),
    ("visa 4111 1111 1111 1111, thanks", f"visa {CARD}, thanks", "credit_card"),
    ("mc 5500-0000-0000-0004.", f"mc {CARD}.", "credit_card"),
    ("amex 378282246310005 on file", f"amex {CARD} on file", "credit_card"),
    ("the server 93.184.216.34 answered", f"the server {IP} answered", "ip_address"),
    ("ping 8.8.8.8.", f"ping {IP}.", "ip_address"),
    ("bare 1.2.3.4 is an address", f"bare {IP} is an address", "ip_address"),
    ("v6 2606:4700:4700::1111 here", f"v6 {IP} here", "ip_address"),
    ("call +44 20 7946 0958 now", f"call {PHONE} now", "phone"),
    ("+1 (415) 555-2671", PHONE, "phone"),
    ("office (555) 123-4567 or 555-123-4567 or 555.123.4567",
     f"office {PHONE} or {PHONE} or {PHONE}", "phone"),
    ("Tel: 020 7946 0958", f"Tel: {PHONE}", "phone"),
    ("phone no. 5551234", f"phone no. {PHONE}", "phone"),
])
def test_each_kind_is_replaced_by_its_placeholder(text, expected, kind):
    out, found = scrub_counted(text)
    assert out == expected
    assert set(found) == {kind} and sum(found.values()) == expected.count(PLACEHOLDERS[kind])


@pytest.mark.parametrize("text", [
    # version numbers: a version word before, a pre-release tag after, glued, longer, or not an address
    "upgrade to version 1.2.3.4 today", "release 10.0.0.1 notes", "v1.2.3.4", "build: 2.0.0.1",
    "1.2.3.4-beta", "6.1.0.7rc1", "Python 3.11.4", "spec 1.2.3.4.5", "octets 1.2.300.4", "zero 1.02.3.4",
    # addresses that identify nobody: private, loopback, documentation
    "router 192.168.1.1", "localhost 127.0.0.1", "doc 198.51.100.7", "docs 2001:db8::1", "C++ std::vector",
    # dates and times
    "on 2024-01-15 at 10:30:45", "le 15.01.2024", "due 01/15/2024", "1999-2000", "2024-01-15T10:30:00Z",
    # ordinary numbers: amounts, decimals, ids, an ISBN, a 16-digit number failing Luhn, a Luhn-valid
    # number with no card network's prefix
    "it cost $1,234,567.89", "pi is 3.14159265", "order 12345678", "ISBN 978-0-306-40615-7",
    "ref 4111111111111112", "id 1234567812345670", "room 101, floor 3", "call me at noon", "year 1066",
    "the ratio 555-1234 is odd",  # 7 digits and no phone word
])
def test_look_alikes_survive(text):
    out, found = scrub_counted(text)
    assert out == text and not found


def test_luhn_and_networks():
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert luhn_ok("1234567812345670") and not card_network("1234567812345670")
    assert card_network("4111111111111111") and card_network("378282246310005") and card_network("5500000000000004")
    assert not card_network("378282246310") and not card_network("9780306406157")


def test_mixed_text_counts_every_replacement():
    text = ("Contact: ann@example.com / bob@example.org, card 4012 8888 8888 1881, host 203.0.114.5, "
            "mobile +49 30 901820 - released in version 2.4.1.0 on 2023-05-01.")
    out, found = scrub_counted(text)
    assert found == {"email": 2, "credit_card": 1, "ip_address": 1, "phone": 1}
    assert "version 2.4.1.0 on 2023-05-01." in out and "@" not in out and "4012" not in out
    assert scrub(out) == out  # placeholders are not PII: scrubbing twice changes nothing
