//! Recall quality of the three rankings on a small labelled set: 40 memories,
//! 20 queries with their relevant memories (written before either ranking
//! was measured). Each ranking runs through the real `SomabrainClient`
//! against the service, each over its own schema.
//!
//! ```sh
//! cargo nextest run -p soma-memory-service --test relevance --no-capture
//! ```
//!
//! prints precision@1, precision@3 and recall@3 (from a `top_k` 3 recall,
//! as the platform's),
//! MRR over the top 10, and the queries each ranking misses. The test
//! fails if the default ranking stops being the best one by MRR.

mod common;

use std::collections::BTreeSet;

use common::TestService;
use soma_memory_service::Ranking;
use soma_somabrain::{CallOptions, Memory, RecallRequest, RememberBatch};

/// The memories, keyed `m01`..`m40`.
const MEMORIES: [&str; 40] = [
    "The user prefers window seats on long flights.",
    "The user booked a hotel near the Eiffel Tower for the June trip to Paris.",
    "The user is allergic to peanuts and tree nuts.",
    "The user drinks oat milk flat whites every morning.",
    "The user's daughter Emma starts primary school in September.",
    "The user runs a half marathon every spring in Berlin.",
    "The user is learning Spanish with an online tutor twice a week.",
    "The user's car is a 2019 electric Hyundai Kona.",
    "The user works as a backend engineer at a logistics company.",
    "The user's favourite cuisine is Japanese, especially ramen.",
    "The user has a dentist appointment on the 14th of March.",
    "The user's cat is called Miso and is nine years old.",
    "The user dislikes horror movies but enjoys science fiction films.",
    "The user's budget for the kitchen renovation is 15,000 euros.",
    "The user plays the cello in an amateur orchestra.",
    "The user's mother lives in Lisbon and visits every Christmas.",
    "The user takes vitamin D supplements during winter.",
    "The user prefers to be contacted by email rather than phone calls.",
    "The user's flight to Tokyo departs on the 2nd of October from Frankfurt.",
    "The user is vegetarian and avoids fish as well.",
    "The user's laptop is a ThinkPad X1 Carbon running Linux.",
    "The user's wedding anniversary is on the 21st of June.",
    "The user is saving for a deposit on an apartment.",
    "The user goes climbing at the bouldering gym on Tuesdays.",
    "The user's password manager is Bitwarden.",
    "The user reads mostly historical novels and biographies.",
    "The user's son plays football for the under-twelve team.",
    "The user has mild asthma and carries an inhaler when running.",
    "The user wants to visit Kyoto's temples during the autumn leaves season.",
    "The user's team uses Rust and PostgreSQL for the routing service.",
    "The user is afraid of dogs since a childhood bite.",
    "The user subscribes to a weekly organic vegetable box.",
    "The user's preferred airline is Lufthansa because of the miles programme.",
    "The user's bank account was switched to a new online bank in January.",
    "The user volunteers at the food bank on Saturday mornings.",
    "The user's grandmother's recipe for apple strudel is a family treasure.",
    "The user needs a visa appointment for the trip to India.",
    "The user's garden has tomatoes, basil and courgettes this year.",
    "The user meditates for ten minutes before work.",
    "The user's gym membership renews automatically in November.",
];

/// Queries and their relevant memories: keyword, inflected, paraphrased,
/// misspelled and vocabulary-mismatch questions.
const QUERIES: [(&str, &[&str]); 20] = [
    ("window or aisle seat on planes", &["m01"]),
    ("Paris hotel", &["m02"]),
    ("food allergies", &["m03"]),
    ("what coffee does the user drink", &["m04"]),
    ("daughter school", &["m05"]),
    ("marathon running", &["m06", "m28"]),
    ("language lessons", &["m07"]),
    ("electric car", &["m08"]),
    ("what is the user's job", &["m09"]),
    ("ramen restaurant", &["m10"]),
    ("dentist appointment", &["m11"]),
    ("what is the cat called", &["m12"]),
    ("films the user likes", &["m13"]),
    ("kitchen renovaton budget", &["m14"]),
    ("musical instrument", &["m15"]),
    ("mother visiting at Christmas", &["m16"]),
    ("flight to Tokyo", &["m19"]),
    ("vegeterian diet", &["m20"]),
    ("Japan travel plans", &["m19", "m29"]),
    ("programming languages at work", &["m30"]),
];

fn key(i: usize) -> String {
    format!("m{:02}", i + 1)
}

#[derive(Debug, Default, Clone, Copy)]
struct Scores {
    p1: f64,
    p3: f64,
    r3: f64,
    mrr: f64,
}

async fn measure(ranking: Ranking) -> (Scores, Vec<&'static str>) {
    let service = TestService::with_ranking(ranking).await;
    let client = service.client();
    let scope = || CallOptions::new().tenant("eval").namespace("eval");
    let items = MEMORIES
        .iter()
        .enumerate()
        .map(|(i, text)| Memory::from_json(key(i), serde_json::json!({ "text": text })).unwrap())
        .collect();
    client
        .remember_batch(
            &RememberBatch {
                items,
                universe: None,
            },
            scope(),
        )
        .await
        .expect("store the labelled memories");
    let mut total = Scores::default();
    let mut misses = Vec::new();
    for (query, relevant) in QUERIES {
        let relevant: BTreeSet<&str> = relevant.iter().copied().collect();
        let found = client
            .recall(&RecallRequest::new(query).top_k(10), scope())
            .await
            .expect("recall");
        let keys: Vec<String> = found
            .results
            .iter()
            .filter_map(|h| h.key().map(str::to_owned))
            .collect();
        let hit = |k: &String| relevant.contains(k.as_str());
        // P@3 and R@3 from the platform's own call (`top_k` 3): the hybrid
        // ranking's trigram pass depends on it.
        let top3 = client
            .recall(&RecallRequest::new(query).top_k(3), scope())
            .await
            .expect("recall top 3")
            .results
            .iter()
            .filter_map(|h| h.key().map(str::to_owned))
            .filter(|k| hit(k))
            .count() as f64;
        total.p1 += keys.first().is_some_and(hit) as u8 as f64;
        total.p3 += top3 / 3.0;
        total.r3 += top3 / relevant.len() as f64;
        match keys.iter().position(hit) {
            Some(rank) => total.mrr += 1.0 / (rank + 1) as f64,
            None => misses.push(query),
        }
    }
    service.stop().await;
    let n = QUERIES.len() as f64;
    let avg = Scores {
        p1: total.p1 / n,
        p3: total.p3 / n,
        r3: total.r3 / n,
        mrr: total.mrr / n,
    };
    (avg, misses)
}

#[tokio::test]
async fn the_default_ranking_is_the_better_one_on_the_labelled_set() {
    let mut measured = Vec::new();
    for ranking in [Ranking::Fts, Ranking::Trigram, Ranking::Hybrid] {
        let (scores, misses) = measure(ranking).await;
        measured.push((ranking, scores, misses));
    }
    println!("ranking  | P@1  | P@3  | R@3  | MRR@10");
    for (ranking, s, _) in &measured {
        println!(
            "{:<8} | {:.2} | {:.2} | {:.2} | {:.2}",
            ranking.as_str(),
            s.p1,
            s.p3,
            s.r3,
            s.mrr
        );
    }
    for (ranking, _, misses) in &measured {
        println!("{} misses: {misses:?}", ranking.as_str());
    }
    let default = measured
        .iter()
        .find(|(r, _, _)| *r == Ranking::default())
        .map(|(_, s, _)| *s)
        .expect("the default ranking is measured");
    for (ranking, other, _) in &measured {
        assert!(
            default.mrr >= other.mrr,
            "the default ranking ({:?}) must be the best by MRR: {default:?} vs {ranking:?} {other:?}",
            Ranking::default()
        );
    }
    assert!(default.mrr >= 0.5, "recall quality regressed: {default:?}");
}
