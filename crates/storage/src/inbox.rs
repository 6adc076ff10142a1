//! The inbox: which messages a consumer group has already processed. Claimed in the same
//! transaction as the handler's effects, so a redelivered message has no second effect.

use sqlx::AnyConnection;

/// Claims `message_id` for `group` inside the caller's transaction. `false`: already processed,
/// skip the effects.
pub async fn claim(
    conn: &mut AnyConnection,
    group: &str,
    message_id: &str,
) -> Result<bool, sqlx::Error> {
    claim_all(conn, &[(group, message_id)]).await
}

/// Claims every `(group, message_id)` in one statement. `false` when any was processed already
/// (the caller rolls back and claims them one by one to find which).
pub async fn claim_all(
    conn: &mut AnyConnection,
    claims: &[(&str, &str)],
) -> Result<bool, sqlx::Error> {
    let inserted =
        crate::bulk::insert_returning_count(conn, CLAIM.0, CLAIM.1, &claim_rows(claims)).await?;
    Ok(inserted == claims.len() as u64)
}

/// The claims as a part of `script`: every one was new when its count (at the index returned)
/// is `claims.len()`.
pub fn stage_claims(script: &mut crate::bulk::Script, claims: &[(&str, &str)]) -> usize {
    script.insert(CLAIM.0, CLAIM.1, claim_rows(claims))
}

/// Like [`stage_claims`], claiming only if the part at `guard` wrote a row (see
/// [`crate::bulk::Script::insert_if`]): for a handler whose effect is a guarded change that a
/// redelivered message cannot make again.
pub fn stage_claims_if(
    script: &mut crate::bulk::Script,
    guard: usize,
    claims: &[(&str, &str)],
) -> usize {
    script.insert_if(guard, CLAIM.0, CLAIM.1, claim_rows(claims))
}

/// The claiming statement around its values.
const CLAIM: (&str, &str) = (
    "INSERT INTO inbox (group_name, message_id, processed_at)",
    "ON CONFLICT (group_name, message_id) DO NOTHING",
);

fn claim_rows(claims: &[(&str, &str)]) -> Vec<Vec<crate::bulk::Value>> {
    let now = crate::time::to_text(crate::time::now());
    claims
        .iter()
        .map(|(group, message_id)| vec![(*group).into(), (*message_id).into(), now.as_str().into()])
        .collect()
}
