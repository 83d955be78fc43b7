//! What a text says: counts, language, keywords, an extractive summary, entities.

use std::collections::{HashMap, HashSet};

use domain::Analysis;
use unicode_segmentation::UnicodeSegmentation;

use super::entities;

/// Below this many words a language guess is a coin toss (seven words came out Catalan).
const MIN_WORDS_FOR_LANGUAGE: u64 = 30;
/// Keyword extraction (YAKE, whose tokenizer runs backtracking regexes) is by far the
/// slowest part of the analysis per character: it reads a [`sample`] of at most this
/// much of the text, spread over the whole of it (so is the language guessed).
const KEYWORD_INPUT_CHARS: usize = 24_000;
/// The summary's sentence segmentation and scoring cost ~55 ms per MB of text: it reads
/// a [`sample`] of at most this much (entities and counts still read all of the text).
const SUMMARY_INPUT_CHARS: usize = 200_000;
/// How many windows a [`sample`] is made of.
const SAMPLE_WINDOWS: usize = 4;
const KEYWORDS: usize = 10;

/// Fill in everything `text` tells into `analysis`. At most `max_chars` of it are
/// searched; all of it is counted.
pub fn analyze_text(text: &str, max_chars: usize, analysis: &mut Analysis) {
    analysis.words = text.unicode_words().count() as u64;
    analysis.characters = text.chars().count() as u64;
    let text = prefix(text, max_chars);
    // Language and keywords both read a sample of the whole text (whatlang, too, costs
    // time in proportion to what it reads, and a sample of ~24,000 characters settles it).
    let few = sample(text, KEYWORD_INPUT_CHARS);
    let language = (analysis.words >= MIN_WORDS_FOR_LANGUAGE)
        .then(|| whatlang::detect(&few))
        .flatten()
        .filter(whatlang::Info::is_reliable)
        .map(|info| info.lang());
    analysis.language = language.map(|l| l.code().to_owned());
    analysis.keywords = keywords(&few, language);
    analysis.summary = summary(&sample(text, SUMMARY_INPUT_CHARS));
    let found = entities::find(text);
    analysis.pii = found.pii;
    analysis.entities = found.entities;
}

/// The first `max` characters of `s`.
fn prefix(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// At most `budget` characters of `text` (and the blank lines between windows) that
/// stand for all of it: the whole text when it is that short; otherwise
/// [`SAMPLE_WINDOWS`] windows, the first at the start and the others spread evenly over
/// the text, in text order, each starting after a line or sentence end and ending at one
/// (when there is one in it), so no sentence is cut. What reads a sample then tells about
/// the whole document, not its first pages, at a bounded cost.
fn sample(text: &str, budget: usize) -> std::borrow::Cow<'_, str> {
    if text.chars().count() <= budget {
        return std::borrow::Cow::Borrowed(text);
    }
    let window = budget / SAMPLE_WINDOWS;
    let mut out = String::with_capacity(budget + 2 * SAMPLE_WINDOWS);
    // Byte offset where the previous window ended: windows never overlap.
    let mut end = 0;
    for k in 0..SAMPLE_WINDOWS {
        let mut start = (text.len() * k / SAMPLE_WINDOWS).max(end);
        while !text.is_char_boundary(start) {
            start += 1;
        }
        let mut rest = &text[start..];
        if k > 0
            && let Some(i) = sentence_ends(prefix(rest, window)).next()
        {
            rest = rest[i..].trim_start();
        }
        let mut piece = prefix(rest, window);
        if piece.len() < rest.len()
            && let Some(i) = sentence_ends(piece).last()
        {
            piece = &piece[..i];
        }
        end = text.len() - rest.len() + piece.len();
        if piece.is_empty() {
            continue;
        }
        if !out.is_empty() {
            out.push_str("\n\n");
        }
        out.push_str(piece);
    }
    std::borrow::Cow::Owned(out)
}

/// The byte offsets just past each line end, and past each `.`, `!` or `?` that a space
/// follows (not the point in "3.50"), in order.
fn sentence_ends(s: &str) -> impl Iterator<Item = usize> + '_ {
    let b = s.as_bytes();
    (0..b.len()).filter_map(move |i| match b[i] {
        b'\n' => Some(i + 1),
        b'.' | b'!' | b'?' if b.get(i + 1).is_some_and(u8::is_ascii_whitespace) => Some(i + 1),
        _ => None,
    })
}

/// YAKE's stop-word list codes for the languages compiled in.
fn yake_code(lang: whatlang::Lang) -> Option<&'static str> {
    use whatlang::Lang;
    Some(match lang {
        Lang::Eng => "en",
        Lang::Deu => "de",
        Lang::Fra => "fr",
        Lang::Spa => "es",
        Lang::Ita => "it",
        Lang::Nld => "nl",
        Lang::Por => "pt",
        Lang::Rus => "ru",
        _ => return None,
    })
}

/// The most telling words and phrases, best first (YAKE: statistical, no model). English
/// stop words when the language is unknown or has no list here.
fn keywords(text: &str, language: Option<whatlang::Lang>) -> Vec<String> {
    let code = language.and_then(yake_code).unwrap_or("en");
    let Some(stop_words) = yake_rust::StopWords::predefined(code) else {
        return Vec::new();
    };
    // YAKE sorts scores with `partial_cmp().unwrap()`: a NaN would panic. A keyword list
    // is not worth failing the analysis for.
    let found = std::panic::catch_unwind(|| {
        yake_rust::get_n_best(KEYWORDS, text, &stop_words, &yake_rust::Config::default())
    })
    .unwrap_or_default();
    let mut seen = HashSet::new();
    found
        .into_iter()
        .map(|k| k.keyword)
        .filter(|k| seen.insert(k.clone()))
        .collect()
}

/// 3 to 5 sentences that carry the text's most frequent content words, in their order in
/// the text. Texts of fewer sentences are given whole.
fn summary(text: &str) -> Vec<String> {
    let sentences: Vec<String> = text
        .unicode_sentences()
        .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|s| (4..=80).contains(&s.unicode_words().count()))
        .collect();
    if sentences.is_empty() {
        return Vec::new();
    }
    let want = (sentences.len() / 10).clamp(3, 5).min(sentences.len());
    let content = |s: &str| -> Vec<String> {
        s.unicode_words()
            .map(str::to_lowercase)
            .filter(|w| w.chars().count() >= 4 && w.chars().any(char::is_alphabetic))
            .collect()
    };
    let mut frequency: HashMap<String, f64> = HashMap::new();
    for s in &sentences {
        for w in content(s) {
            *frequency.entry(w).or_default() += 1.0;
        }
    }
    let mut scored: Vec<(usize, f64)> = sentences
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let words = content(s);
            let distinct: HashSet<&String> = words.iter().collect();
            let score: f64 = distinct.iter().map(|w| frequency[*w]).sum::<f64>()
                / (words.len().max(1) as f64).sqrt();
            (i, score)
        })
        .collect();
    scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut chosen: Vec<usize> = scored.into_iter().take(want).map(|(i, _)| i).collect();
    chosen.sort_unstable();
    chosen.into_iter().map(|i| sentences[i].clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENGLISH: &str = "Solar panels and wind turbines now supply most of the electricity \
        used by the harbour district. The city council approved a budget for battery storage. \
        Battery storage smooths the daily peaks that solar panels cannot cover in winter. \
        Wind turbines offshore produced more energy than forecast during the autumn storms. \
        Residents reported lower electricity bills after the district joined the programme. \
        The next review of renewable energy targets is scheduled for the autumn.";

    #[test]
    fn an_english_text_gets_counts_language_keywords_and_a_summary() {
        let mut a = Analysis::default();
        analyze_text(ENGLISH, 1_000_000, &mut a);
        assert_eq!(a.words, ENGLISH.split_whitespace().count() as u64);
        assert_eq!(a.language.as_deref(), Some("eng"));
        assert!(!a.keywords.is_empty(), "{:?}", a.keywords);
        assert!(
            a.keywords
                .iter()
                .any(|k| k.contains("solar") || k.contains("wind") || k.contains("battery")),
            "{:?}",
            a.keywords
        );
        assert_eq!(a.summary.len(), 3, "{:?}", a.summary);
        // In text order, each one a sentence of the text.
        for s in &a.summary {
            assert!(
                ENGLISH
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
                    .contains(s.as_str())
            );
        }
    }

    #[test]
    fn keywords_and_language_come_from_the_whole_of_a_long_text() {
        let first = "Solar panels and wind turbines supply the harbour district. ".repeat(600);
        let last = "The supplier invoice for the warehouse lease is overdue again. ".repeat(600);
        let text = format!("{first}\n{last}");
        let sampled = sample(&text, KEYWORD_INPUT_CHARS);
        // Four windows and the blank lines between them.
        assert!(sampled.chars().count() <= KEYWORD_INPUT_CHARS + 6);
        assert!(sampled.contains("invoice") && sampled.contains("Solar"));
        // Every window is whole sentences.
        for window in sampled.split("\n\n") {
            assert!(
                window.starts_with("Solar") || window.starts_with("The"),
                "{window:.40}"
            );
            assert!(window.ends_with('.'), "{window:.40}");
        }
        let mut a = Analysis::default();
        analyze_text(&text, 1_000_000, &mut a);
        assert_eq!(a.language.as_deref(), Some("eng"));
        let has = |words: &[&str]| {
            a.keywords
                .iter()
                .any(|k| words.iter().any(|w| k.to_lowercase().contains(w)))
        };
        assert!(
            has(&["invoice", "warehouse", "supplier", "lease"]),
            "{:?}",
            a.keywords
        );
        assert!(
            has(&["solar", "wind", "turbines", "harbour"]),
            "{:?}",
            a.keywords
        );
    }

    #[test]
    fn a_short_text_is_its_own_sample() {
        assert!(matches!(
            sample(ENGLISH, 1_000),
            std::borrow::Cow::Borrowed(s) if s == ENGLISH
        ));
    }

    #[test]
    fn the_summary_of_a_long_text_is_whole_sentences_of_it() {
        let text: String = (0..20_000)
            .map(|i| format!("Report {i} on the harbour budget was approved by the council. "))
            .collect();
        assert!(text.chars().count() > SUMMARY_INPUT_CHARS);
        let mut a = Analysis::default();
        analyze_text(&text, usize::MAX, &mut a);
        assert!((3..=5).contains(&a.summary.len()), "{:?}", a.summary);
        for s in &a.summary {
            assert!(s.starts_with("Report ") && s.ends_with("council."), "{s}");
            assert!(text.contains(s.as_str()));
        }
    }

    #[test]
    fn a_short_text_gets_no_language_guess() {
        let mut a = Analysis::default();
        analyze_text("Ceci est court.", 1_000, &mut a);
        assert_eq!(a.language, None);
        assert_eq!(a.words, 3);
        assert!(a.summary.is_empty());
    }

    #[test]
    fn only_the_first_characters_are_searched_but_all_are_counted() {
        let mut a = Analysis::default();
        let text = format!("{} mail ann@example.com", "word ".repeat(100));
        analyze_text(&text, 100, &mut a);
        // UAX #29 words: the address counts as two ("ann", "example.com").
        assert_eq!(a.words, 103);
        assert!(a.entities.emails.is_empty());
    }
}
