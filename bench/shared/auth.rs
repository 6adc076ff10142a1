//! What the benchmark clients share (included by each with `#[path]`).

/// `Authorization: Bearer $ORDERWAVE_TOKEN` (bench/lib.sh mints it).
pub fn auth_headers() -> anyhow::Result<reqwest::header::HeaderMap> {
    use anyhow::Context;
    let token = std::env::var("ORDERWAVE_TOKEN")
        .context("ORDERWAVE_TOKEN: an admin token (orderwave token --sub bench --role admin)")?;
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {token}").parse()?,
    );
    Ok(headers)
}
