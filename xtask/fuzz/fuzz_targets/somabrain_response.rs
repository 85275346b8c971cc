//! Every SomaBrain response body the client decodes: never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use soma_somabrain::{
    ContextResponse, FeedbackResponse, RecallResponse, RememberBatchResponse, RememberResponse,
};

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = serde_json::from_slice::<RecallResponse>(data) {
        let _ = r.ltm_hits_truncated();
        for hit in &r.results {
            let _ = hit.key();
        }
    }
    if let Ok(r) = serde_json::from_slice::<RememberResponse>(data) {
        let _ = r.is_confirmed();
    }
    if let Ok(r) = serde_json::from_slice::<RememberBatchResponse>(data) {
        let _ = r.is_confirmed();
    }
    let _ = serde_json::from_slice::<ContextResponse>(data);
    let _ = serde_json::from_slice::<FeedbackResponse>(data);
});
