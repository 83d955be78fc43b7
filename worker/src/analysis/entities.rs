//! Entities (emails, URLs, dates, phone numbers, money amounts) and PII flags (card
//! numbers that pass the Luhn check, IBANs that pass mod-97).

use std::sync::LazyLock;

use domain::{Analysis, Entities, PiiFlags};
use regex::Regex;

/// What [`find`] found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Found {
    pub entities: Entities,
    pub pii: PiiFlags,
}

const MONTHS: &str = "(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?|Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)";

/// White space as Unicode's `\s` has it, spelled out.
///
/// The patterns below spell out ASCII digits, this class and ASCII word boundaries
/// instead of Unicode `\d`, `\s` and `\b`: every analysis runs in a fresh child process,
/// which compiles them anew, and the Unicode classes made that compilation cost ~3 ms per
/// document; Unicode word boundaries also stop the fast engine at the first non-ASCII
/// character.
const SP: &str = r"[\t\n\x0B\x0C\r \u{85}\u{A0}\u{1680}\u{2000}-\u{200A}\u{2028}\u{2029}\u{202F}\u{205F}\u{3000}]";

static DATE: LazyLock<Option<Regex>> = LazyLock::new(|| {
    Regex::new(&format!(
        r"(?-u:\b)(?:[0-9]{{4}}-[0-9]{{2}}-[0-9]{{2}}|[0-9]{{1,2}}[/.][0-9]{{1,2}}[/.][0-9]{{2,4}}|[0-9]{{1,2}}{SP}+{MONTHS}\.?,?{SP}+[0-9]{{4}}|{MONTHS}\.?{SP}+[0-9]{{1,2}},?{SP}+[0-9]{{4}})(?-u:\b)"
    ))
    .ok()
});

/// International (`+`), bracketed area code, or national trunk prefix (`0`) forms: a bare
/// run of digits is more often an amount, a date or an id than a phone number.
static PHONE: LazyLock<Option<Regex>> = LazyLock::new(|| {
    Regex::new(&format!(
        r"(?:\+[0-9]{{1,3}}(?:{SP}|[.-])?|\([0-9]{{1,5}}\)(?:{SP}|[.-])?|(?-u:\b)0)[0-9]{{1,4}}(?:(?:{SP}|[.-])?[0-9]{{2,4}}){{1,4}}(?-u:\b)"
    ))
    .ok()
});

static MONEY: LazyLock<Option<Regex>> = LazyLock::new(|| {
    let amount = format!(
        r"[0-9]{{1,3}}(?:(?:[,.]|{SP})[0-9]{{3}})*(?:[.,][0-9]{{1,2}})?|[0-9]+(?:[.,][0-9]{{1,2}})?"
    );
    Regex::new(&format!(
        r"(?:[$€£¥]{SP}?(?:{amount})(?-u:\b)|(?-u:\b)(?:USD|EUR|GBP|JPY|CHF){SP}?(?:{amount})(?-u:\b)|(?-u:\b)(?:{amount}){SP}?(?:USD|EUR|GBP|JPY|CHF|dollars|euros|pounds)(?-u:\b))"
    ))
    .ok()
});

/// Runs of 13 or more digits in groups; [`card_in`] finds the card number in a run (a
/// trailing group such as an expiry month may be caught with it).
static CARD: LazyLock<Option<Regex>> =
    LazyLock::new(|| Regex::new(r"(?-u:\b)[0-9](?:[ \t\r\n-]?[0-9]){12,24}(?-u:\b)").ok());

/// A country code, check digits and up to 30 more letters and digits in groups;
/// [`iban_in`] finds the IBAN in it (a following word such as "BIC" may be caught).
static IBAN: LazyLock<Option<Regex>> = LazyLock::new(|| {
    Regex::new(r"(?-u:\b)[A-Z]{2}[0-9]{2}(?:[ \t\r\n]?[A-Z0-9]){11,40}(?-u:\b)").ok()
});

/// The longest run of whole leading groups of `candidate` that `valid` accepts.
fn leading_groups(candidate: &str, valid: impl Fn(&str) -> bool) -> Option<String> {
    let groups: Vec<&str> = candidate.split([' ', '\t', '-']).collect();
    (1..=groups.len())
        .rev()
        .map(|n| groups[..n].join(" "))
        .find(|s| valid(s))
}

fn card_in(candidate: &str) -> Option<String> {
    leading_groups(candidate, |s| luhn(&digits(s)))
}

fn iban_in(candidate: &str) -> Option<String> {
    leading_groups(candidate, iban_valid)
}

fn matches(re: &LazyLock<Option<Regex>>, text: &str) -> Vec<String> {
    re.as_ref()
        .map(|re| {
            re.find_iter(text)
                // Wrapped lines (HTML is rendered at a fixed width) put line breaks
                // inside an entity: one space, as written.
                .map(|m| m.as_str().split_whitespace().collect::<Vec<_>>().join(" "))
                .collect()
        })
        .unwrap_or_default()
}

/// Keep the first of each, in order, up to the analysis's bound.
fn distinct(items: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    items
        .into_iter()
        .filter(|s| seen.insert(s.clone()))
        .take(Analysis::MAX_ENTITIES_PER_KIND)
        .collect()
}

fn digits(s: &str) -> String {
    s.chars().filter(char::is_ascii_digit).collect()
}

pub fn find(text: &str) -> Found {
    let mut emails = Vec::new();
    let mut urls = Vec::new();
    for link in linkify::LinkFinder::new().links(text) {
        match link.kind() {
            linkify::LinkKind::Email => emails.push(link.as_str().to_owned()),
            linkify::LinkKind::Url => urls.push(link.as_str().to_owned()),
            _ => {}
        }
    }
    let dates = matches(&DATE, text);
    let cards: Vec<String> = matches(&CARD, text)
        .iter()
        .filter_map(|c| card_in(c))
        .collect();
    let ibans: Vec<String> = matches(&IBAN, text)
        .iter()
        .filter_map(|i| iban_in(i))
        .collect();
    let phones: Vec<String> = matches(&PHONE, text)
        .into_iter()
        .filter(|p| (7..=15).contains(&digits(p).len()))
        .filter(|p| {
            !dates
                .iter()
                .any(|d| d.contains(p.as_str()) || p.contains(d.as_str()))
        })
        .filter(|p| !cards.iter().any(|c| c.contains(p.as_str())))
        .filter(|p| !ibans.iter().any(|i| i.contains(p.as_str())))
        .collect();
    let money = matches(&MONEY, text);
    let pii = PiiFlags {
        email: !emails.is_empty(),
        phone: !phones.is_empty(),
        card_number: !cards.is_empty(),
        iban: !ibans.is_empty(),
    };
    Found {
        entities: Entities {
            emails: distinct(emails),
            urls: distinct(urls),
            dates: distinct(dates),
            phone_numbers: distinct(phones),
            money: distinct(money),
        },
        pii,
    }
}

/// The Luhn check of a card number (13 to 19 digits).
pub fn luhn(number: &str) -> bool {
    if !(13..=19).contains(&number.len()) || !number.bytes().all(|b| b.is_ascii_digit()) {
        return false;
    }
    let sum: u32 = number
        .bytes()
        .rev()
        .enumerate()
        .map(|(i, b)| {
            let d = u32::from(b - b'0');
            if i % 2 == 1 {
                let d = d * 2;
                if d > 9 { d - 9 } else { d }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// The ISO 13616 check of an IBAN (spaces allowed): the country code and check digits
/// moved to the end, letters as numbers, the whole mod 97 is 1.
pub fn iban_valid(iban: &str) -> bool {
    let compact: String = iban.chars().filter(|c| !c.is_whitespace()).collect();
    if !(15..=34).contains(&compact.len()) || !compact.chars().all(|c| c.is_ascii_alphanumeric()) {
        return false;
    }
    let (head, tail) = compact.split_at(4);
    let mut remainder: u32 = 0;
    for c in tail.chars().chain(head.chars()) {
        let value = match c.to_digit(36) {
            Some(v) => v,
            None => return false,
        };
        remainder = if value >= 10 {
            (remainder * 100 + value) % 97
        } else {
            (remainder * 10 + value) % 97
        };
    }
    remainder == 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_accept_real_numbers_and_refuse_typos() {
        assert!(luhn("4111111111111111"));
        assert!(!luhn("4111111111111112"));
        assert!(!luhn("411111"));
        assert!(iban_valid("GB82 WEST 1234 5698 7654 32"));
        assert!(iban_valid("DE89370400440532013000"));
        assert!(!iban_valid("GB82 WEST 1234 5698 7654 33"));
        assert!(!iban_valid("GB82"));
    }

    #[test]
    fn entities_and_pii_are_found_and_lookalikes_are_not() {
        let f = find(
            "Write to ann@example.com or see https://example.org/a?b=1. Call +44 20 7946 0958 \
             before 14 March 2026 or 2026-09-30. The budget is $2,500,000 or EUR 1.200,50. \
             Card 4111 1111 1111 1111, IBAN GB82 WEST 1234 5698 7654 32. Order 12345678 \
             and card 4111 1111 1111 1112 are neither.",
        );
        assert_eq!(f.entities.emails, ["ann@example.com"]);
        assert_eq!(f.entities.urls, ["https://example.org/a?b=1"]);
        assert_eq!(f.entities.dates, ["14 March 2026", "2026-09-30"]);
        assert_eq!(f.entities.phone_numbers, ["+44 20 7946 0958"]);
        assert!(
            f.entities.money.contains(&"$2,500,000".to_owned()),
            "{:?}",
            f.entities.money
        );
        assert!(
            f.entities.money.iter().any(|m| m.starts_with("EUR 1.200")),
            "{:?}",
            f.entities.money
        );
        assert_eq!(
            f.pii,
            PiiFlags {
                email: true,
                phone: true,
                card_number: true,
                iban: true
            }
        );
        // Followed by what usually follows them: an expiry date, a BIC.
        let f =
            find("Card 4111 1111 1111 1111 12/27. IBAN GB82 WEST 1234 5698 7654 32 BIC NWBKGB2L.");
        assert!(f.pii.card_number && f.pii.iban, "{:?}", f.pii);
        let none = find("Nothing personal here: order 12345678, 3 items.");
        assert_eq!(none.pii, PiiFlags::default());
        assert!(none.entities.phone_numbers.is_empty());
    }

    #[test]
    fn amounts_dates_and_phones_in_the_forms_documents_write_them() {
        let nbsp = '\u{a0}';
        let narrow = '\u{202f}';
        let text = format!(
            "Total: €{nbsp}1{narrow}250,50 due 5{nbsp}March 2026, then ¥1,000円 and £12.99; \
             Call +44 20 7946 0958 or (030) 1234 5678. \
             Prices: 1 000 000 EUR, 45 dollars. Signed 12.03.2024г. and on March 5, 2026."
        );
        let f = find(&text);
        // Found across no-break spaces, and written with one plain space as found.
        assert_eq!(
            f.entities.money,
            [
                "€ 1 250,50".to_owned(),
                "¥1,000".to_owned(),
                "£12.99".to_owned(),
                "1 000 000 EUR".to_owned(),
                "45 dollars".to_owned(),
            ],
        );
        assert_eq!(
            f.entities.dates,
            ["5 March 2026", "12.03.2024", "March 5, 2026"]
        );
        assert_eq!(
            f.entities.phone_numbers,
            ["+44 20 7946 0958", "(030) 1234 5678"]
        );
        assert!(f.pii.phone);
        // Digits of other scripts are not read as numbers (the patterns spell out 0-9).
        assert!(find("٢٠٢٤-٠١-١٥").entities.dates.is_empty());
    }
}
