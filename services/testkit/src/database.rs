use std::str::FromStr;

use sqlx::{
    ConnectOptions, Connection, PgConnection, PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};

/// A database of its own for one test, dropped (with its connections) when this is dropped.
pub struct TestDatabase {
    name: String,
    options: PgConnectOptions,
    url: String,
}

impl TestDatabase {
    /// Creates a new, empty database. Panics with a clear message when PostgreSQL is
    /// unreachable.
    pub async fn create() -> Self {
        let admin_url = crate::database_url();
        let admin = PgConnectOptions::from_str(&admin_url)
            .unwrap_or_else(|e| panic!("TEST_DATABASE_URL {admin_url:?} is invalid: {e}"));
        let mut conn = admin.connect().await.unwrap_or_else(|e| {
            panic!("PostgreSQL at {admin_url} is required for this test but unreachable: {e}")
        });
        let name = crate::unique("db");
        sqlx::query(sqlx::AssertSqlSafe(format!("create database \"{name}\"")))
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("cannot create test database {name}: {e}"));
        let _ = conn.close().await;
        let options = admin.clone().database(&name);
        let url = replace_database(&admin_url, &name);
        Self { name, options, url }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Connection options for this database.
    pub fn options(&self) -> PgConnectOptions {
        self.options.clone()
    }

    /// A URL for this database, for services configured by `DATABASE_URL`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A small pool on this database.
    pub async fn pool(&self) -> PgPool {
        PgPoolOptions::new()
            .max_connections(8)
            .connect_with(self.options())
            .await
            .unwrap_or_else(|e| panic!("cannot connect to test database {}: {e}", self.name))
    }

    /// One raw connection (for reading rows as stored).
    pub async fn connection(&self) -> PgConnection {
        self.options()
            .connect()
            .await
            .unwrap_or_else(|e| panic!("cannot connect to test database {}: {e}", self.name))
    }
}

fn replace_database(url: &str, name: &str) -> String {
    // postgres://user@host:port/db?params
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match base[scheme_end..].find('/') {
        Some(slash) => &base[..scheme_end + slash],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let admin_url = crate::database_url();
        let name = self.name.clone();
        crate::block_on_thread(async move {
            let Ok(options) = PgConnectOptions::from_str(&admin_url) else {
                return;
            };
            match options.connect().await {
                Ok(mut conn) => {
                    if let Err(error) = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "drop database if exists \"{name}\" with (force)"
                    )))
                    .execute(&mut conn)
                    .await
                    {
                        eprintln!("testkit: cannot drop test database {name}: {error}");
                    }
                    let _ = conn.close().await;
                }
                Err(error) => eprintln!("testkit: cannot drop test database {name}: {error}"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::replace_database;

    #[test]
    fn replaces_the_database_name() {
        assert_eq!(
            replace_database("postgres://postgres@127.0.0.1:5432/postgres", "x"),
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(
            replace_database("postgres://u@h/postgres?sslmode=disable", "x"),
            "postgres://u@h/x?sslmode=disable"
        );
        assert_eq!(replace_database("postgres://u@h", "x"), "postgres://u@h/x");
    }
}
