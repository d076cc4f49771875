//! The Veil router: sessions, key service, task queue, APIs. Arrives with the Router milestone.
