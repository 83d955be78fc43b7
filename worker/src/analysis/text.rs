//! What a text says: counts, language, keywords, an extractive summary, entities.

use std::collections::{HashMap, HashSet};

use domain::Analysis;
use unicode_segmentation::UnicodeSegmentation;

use super::entities;

/// Below this many words a language guess is a coin toss (seven words came out Catalan).
const MIN_WORDS_FOR_LANGUAGE: u64 = 30;
/// Keyword extraction is the slow part; it reads at most this much of the text.
const KEYWORD_INPUT_CHARS: usize = 100_000;
const KEYWORDS: usize = 10;

/// Fill in everything `text` tells into `analysis`. At most `max_chars` of it are
/// searched; all of it is counted.
pub fn analyze_text(text: &str, max_chars: usize, analysis: &mut Analysis) {
    analysis.words = text.unicode_words().count() as u64;
    analysis.characters = text.chars().count() as u64;
    let text = prefix(text, max_chars);
    let language = (analysis.words >= MIN_WORDS_FOR_LANGUAGE)
        .then(|| whatlang::detect(text))
        .flatten()
        .filter(whatlang::Info::is_reliable)
        .map(|info| info.lang());
    analysis.language = language.map(|l| l.code().to_owned());
    analysis.keywords = keywords(prefix(text, KEYWORD_INPUT_CHARS), language);
    analysis.summary = summary(text);
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
