//! Query strings as every list reads them.

/// The `key=value` pairs of a query string, decoded, leaving out those with an empty value:
/// `?cursor=&status=` is the query without them (as an HTML form sends its blank fields), not
/// an invalid cursor or status.
pub fn pairs(query: Option<&str>) -> Vec<(String, String)> {
    form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .filter(|(_, value)| !value.is_empty())
        .map(|(key, value)| (key.into_owned(), value.into_owned()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::pairs;

    #[test]
    fn blank_values_are_left_out_and_the_rest_decoded() {
        assert_eq!(
            pairs(Some("cursor=&status=PENDING&status=SHIPPED&q=a%20b&empty")),
            [
                ("status".to_string(), "PENDING".to_string()),
                ("status".to_string(), "SHIPPED".to_string()),
                ("q".to_string(), "a b".to_string()),
            ]
        );
        assert!(pairs(None).is_empty());
    }
}
