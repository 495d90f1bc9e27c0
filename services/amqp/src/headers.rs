use lapin::types::{AMQPValue, FieldTable, ShortString};

/// The string-valued headers of a message as (name, value) pairs (trace context, reasons).
pub fn headers_to_pairs(table: Option<&FieldTable>) -> Vec<(String, String)> {
    let Some(table) = table else {
        return Vec::new();
    };
    table
        .inner()
        .iter()
        .filter_map(|(k, v)| {
            let value = match v {
                AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                AMQPValue::ShortString(s) => s.as_str().to_owned(),
                AMQPValue::LongLongInt(n) => n.to_string(),
                AMQPValue::LongInt(n) => n.to_string(),
                _ => return None,
            };
            Some((k.as_str().to_owned(), value))
        })
        .collect()
}

/// One string header of a message.
pub fn string_header(table: Option<&FieldTable>, name: &str) -> Option<String> {
    headers_to_pairs(table)
        .into_iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
}

pub(crate) fn pairs_to_table(pairs: &[(String, String)]) -> FieldTable {
    let mut table = FieldTable::default();
    for (k, v) in pairs {
        table.insert(
            ShortString::from(k.as_str()),
            AMQPValue::LongString(v.as_str().into()),
        );
    }
    table
}
