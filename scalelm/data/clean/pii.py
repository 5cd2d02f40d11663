"""``--scrub-pii``: e-mail addresses, phone numbers, IP addresses and payment-card numbers become
typed placeholders (``<EMAIL_ADDRESS>``, ``<PHONE_NUMBER>``, ``<IP_ADDRESS>``, ``<CREDIT_CARD>``,
Presidio's names; datatrove's PII formatter does the same for e-mails and IPs).

Each kind is a regular expression for candidates and a check that keeps what only looks alike:

- **e-mail**: ``local@domain.tld``, a top-level domain of letters;
- **payment card**: 13-19 digits, single spaces or dashes allowed between them, that pass the
  Luhn check *and* start with a card network's prefix at a length that network issues (Visa 4,
  Mastercard 51-55/2221-2720, Amex 34/37, Discover/UnionPay/Maestro 6, JCB 3528-3589, Diners
  300-305/36/38/39), so an ISBN or a long ordinary number stays;
- **IP address**: IPv4 dotted quads and IPv6 that Python's ``ipaddress`` accepts and that are
  *public* (``is_global``): private, loopback, link-local, documentation and reserved addresses
  identify nobody and stay, as datatrove's ``only_remove_public_ips``. Versions and IPs look alike:
  a dotted quad is a **version, not an IP**, when it follows a version word (``v``, ``version``,
  ``ver``, ``release``, ``build``, ``rev``, ``revision``, ``update``, ``firmware``) or is
  followed by a pre-release tag (``-beta``, ``-rc1``, ...), when it is part of a longer dotted
  run (``1.2.3.4.5``) or glued to a word (``v1.2.3.4``), or when an octet is over 255 or has a
  leading zero (``2.10.300.1``, ``1.02.3.4``). A bare public quad (``1.2.3.4``) is an address;
  three-part versions (``3.11.4``) never match;
- **phone number**: ``+`` and a country code with 8-15 digits in all (``+44 20 7946 0958``),
  North-American ``(555) 123-4567`` / ``555-123-4567`` / ``555.123.4567``, or 7-15 digits right
  after a phone word (``tel``, ``phone``, ``fax``, ``mobile``, ``cell``, ``call``). Dates
  (``2024-01-15``, ``15.01.2024``, ``01/15/2024``), times, years, prices and plain numbers match
  none of these.

The report shows the text around each replacement with the placeholder in it, never the value.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter

KINDS = ("email", "credit_card", "ip_address", "phone")  # in the order they are replaced
PLACEHOLDERS = {"email": "<EMAIL_ADDRESS>", "credit_card": "<CREDIT_CARD>", "ip_address": "<IP_ADDRESS>",
                "phone": "<PHONE_NUMBER>"}

# Each pattern starts with a character class, then looks behind that first character: then the
# regex engine skips to candidate characters quickly (a leading look-behind costs 3-10x the time).
EMAIL = re.compile(r"[A-Za-z0-9](?<![\w.%+-][A-Za-z0-9])[A-Za-z0-9._%+-]{0,63}@"
                   r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w-])")
CARD = re.compile(r"\d(?<![\w.,+-]\d)(?:[ -]?\d){12,18}(?!\w|[.,-]\d)")
IPV4 = re.compile(r"\d(?<![\w.]\d)\d{0,2}(?:\.\d{1,3}){3}(?!\.?\w)")
IPV6 = re.compile(r"[0-9A-Fa-f:](?<![\w:.][0-9A-Fa-f:])[0-9A-Fa-f]{0,3}:[0-9A-Fa-f:]{2,36}(?![\w:.])")
PHONE_INTL = re.compile(r"\+(?<![\w+]\+)\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,6}(?![\w-])")
PHONE_NANP = re.compile(r"\((?<![\w(+-]\()\d{3}\) ?\d{3}[.-]\d{4}(?![\w-]|\.\d)"
                        r"|\d(?<![\w(+-]\d)\d\d[.-]\d{3}[.-]\d{4}(?![\w-]|\.\d)")
NUMBER = re.compile(r"[+(\d](?<![\w+(.,-][+(\d])[\d ().-]{5,22}\d(?![\w-]|[.,]\d)")  # phone after a phone word
PHONE_WORD = re.compile(r"(?i)\b(?:tel|telephone|phone|ph|fax|mobile|mob|cell|call)\b\.?\s*(?:no\.?|number|#)?"
                        r"\s*[:.]?\s*$")
VERSION_BEFORE = re.compile(r"(?i)(?:\bv|\bversion|\bver|\brelease|\bbuild|\brev|\brevision|\bupdate|\bfirmware)"
                            r"\.?\s*[:#]?\s*$")
_DIGIT = re.compile(r"\d")
VERSION_AFTER = re.compile(r"(?i)[-+~._]?(?:alpha|beta|rc|dev|pre|post|snapshot|final)")


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def card_network(d: str) -> bool:
    """Does ``d`` (digits) start like a card of a network that issues numbers of its length?"""
    n, p2, p3, p4 = len(d), int(d[:2]), int(d[:3]), int(d[:4])
    return ((d[0] == "4" and n in (13, 16, 19)) or (51 <= p2 <= 55 and n == 16) or (2221 <= p4 <= 2720 and n == 16)
            or (p2 in (34, 37) and n == 15) or ((300 <= p3 <= 305 or p2 in (36, 38, 39)) and 14 <= n <= 19)
            or (3528 <= p4 <= 3589 and 16 <= n <= 19) or (d[0] == "6" and 16 <= n <= 19))


def _is_card(m: re.Match) -> bool:
    digits = re.sub(r"\D", "", m.group())
    return 13 <= len(digits) <= 19 and card_network(digits) and luhn_ok(digits)


def _is_ipv4(m: re.Match) -> bool:
    s, text = m.group(), m.string
    if VERSION_BEFORE.search(text, max(0, m.start() - 16), m.start()) or VERSION_AFTER.match(text, m.end()):
        return False
    try:  # strict: an octet over 255 or with a leading zero is not an address
        return ipaddress.IPv4Address(s).is_global
    except ValueError:
        return False


def _is_ipv6(m: re.Match) -> bool:
    s = m.group()
    if sum(1 for g in s.split(":") if g) < 3:  # a::b, dead:beef: ... are not worth the risk
        return False
    try:
        return ipaddress.IPv6Address(s).is_global
    except ValueError:
        return False


def _digit_count(s: str) -> int:
    return sum(c.isdigit() for c in s)


def _is_phone(m: re.Match) -> bool:
    return 8 <= _digit_count(m.group()) <= 15  # E.164 numbers have at most 15 digits


def _is_worded_phone(m: re.Match) -> bool:
    # after "tel:" a local number of 7 digits is one too
    before = PHONE_WORD.search(m.string, max(0, m.start() - 32), m.start())
    return before is not None and 7 <= _digit_count(m.group()) <= 15


# (kind, pattern, check, a character the text must hold for the pattern to match)
RULES: tuple = (
    ("email", EMAIL, None, "@"),
    ("credit_card", CARD, _is_card, None),
    ("ip_address", IPV4, _is_ipv4, "."),
    ("ip_address", IPV6, _is_ipv6, ":"),
    ("phone", PHONE_INTL, _is_phone, "+"),
    ("phone", PHONE_NANP, None, None),
    ("phone", NUMBER, _is_worded_phone, None),
)


def scrub_counted(text: str) -> tuple[str, Counter]:
    """``(text with placeholders, replacements by kind)``."""
    found: Counter = Counter()
    digits = _DIGIT.search(text) is not None
    for kind, pattern, check, needs in RULES:
        if kind != "email" and not digits:
            break  # every kind after e-mail needs a digit
        if needs is not None and needs not in text:
            continue
        text = pattern.sub(_replacer(kind, check, found), text)
    return text, found


def scrub(text: str) -> str:
    """``text`` with its PII replaced by placeholders (see the module doc)."""
    return scrub_counted(text)[0]


def _replacer(kind: str, check, found: Counter):
    placeholder = PLACEHOLDERS[kind]

    def replace(m: re.Match) -> str:
        if check is not None and not check(m):
            return m.group()
        found[kind] += 1
        return placeholder

    return replace

