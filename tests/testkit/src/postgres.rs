//! Throwaway PostgreSQL databases for tests.
//!
//! The server comes from the environment: [`DATABASE_URL_ENV`] (`VEIL_TEST_DATABASE_URL`) names
//! a server and a database to connect to for administration, e.g.
//! `postgres://veil@127.0.0.1:5433/postgres`. `scripts/test.sh` starts a throwaway server and
//! sets it (the `setup_postgres` function of `scripts/lib/postgres.sh` does that on its own).
//! Tests that need PostgreSQL fail, never skip, when it is not set.
//!
//! Each test gets a database of its own ([`TestDatabase::create`]), so tests run in parallel
//! without seeing each other's rows.

use sqlx::Connection;
use sqlx::postgres::PgConnection;

/// Environment variable naming the PostgreSQL server for tests.
pub const DATABASE_URL_ENV: &str = "VEIL_TEST_DATABASE_URL";

/// The administration URL from [`DATABASE_URL_ENV`]; panics with instructions when it is unset.
pub fn server_url() -> String {
    match std::env::var(DATABASE_URL_ENV) {
        Ok(url) if !url.trim().is_empty() => url.trim().to_owned(),
        _ => panic!(
            "{DATABASE_URL_ENV} is not set. The PostgreSQL tests need a server and never skip: \
             run scripts/test.sh, which starts a throwaway one, or in bash \
             `source scripts/lib/postgres.sh; setup_postgres` before `cargo test`, or point \
             {DATABASE_URL_ENV} at a server where the user may create databases \
             (e.g. postgres://user@127.0.0.1:5432/postgres)."
        ),
    }
}

/// `url` with its database (the path) replaced by `database`; query parameters are kept.
///
/// ```
/// # use veil_testkit::postgres::with_database;
/// assert_eq!(
///     with_database("postgres://u@127.0.0.1:5432/postgres?sslmode=disable", "t1"),
///     "postgres://u@127.0.0.1:5432/t1?sslmode=disable"
/// );
/// assert_eq!(with_database("postgres://u@h", "t1"), "postgres://u@h/t1");
/// ```
pub fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let path_start = base[authority_start..]
        .find('/')
        .map_or(base.len(), |i| authority_start + i);
    let mut out = format!("{}/{database}", &base[..path_start]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// A database created for one test on the server of [`server_url`].
///
/// Call [`TestDatabase::drop_database`] at the end of the test to remove it; a test that panics
/// leaves it behind (the throwaway server of the test script is deleted as a whole).
#[derive(Debug)]
pub struct TestDatabase {
    name: String,
    url: String,
    admin_url: String,
}

impl TestDatabase {
    /// Creates an empty database named `veil_test_<unique>`; panics when the server cannot be
    /// reached or refuses.
    pub async fn create() -> Self {
        let admin_url = server_url();
        let name = crate::unique_name("veil_test").replace('-', "_");
        let mut conn = admin_connection(&admin_url).await;
        // The name is generated here from [a-z0-9_]; quoting keeps it an identifier regardless.
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL at {admin_url}: CREATE DATABASE {name}: {e}"));
        let _ = conn.close().await;
        Self {
            url: with_database(&admin_url, &name),
            name,
            admin_url,
        }
    }

    /// Its URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Drops the database, disconnecting whoever is still connected to it.
    pub async fn drop_database(self) {
        let mut conn = admin_connection(&self.admin_url).await;
        let name = &self.name;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
        )))
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL: DROP DATABASE {name}: {e}"));
        let _ = conn.close().await;
    }
}

async fn admin_connection(url: &str) -> PgConnection {
    PgConnection::connect(url).await.unwrap_or_else(|e| {
        panic!(
            "cannot connect to PostgreSQL at {url} ({DATABASE_URL_ENV}): {e}. Is the server \
             running? scripts/test.sh starts one."
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_is_replaced_in_urls() {
        assert_eq!(
            with_database("postgres://u@127.0.0.1:1/postgres", "x"),
            "postgres://u@127.0.0.1:1/x"
        );
        assert_eq!(
            with_database("postgresql://u:p@h:1/?sslmode=disable", "x"),
            "postgresql://u:p@h:1/x?sslmode=disable"
        );
    }
}
