-- Per-caller request rates shared by every replica (generic cell rate algorithm): for each
-- API key or wallet, the theoretical arrival time of its next request, in microseconds. A row
-- whose time has passed is at its full quota and may be removed.
CREATE TABLE rate_limits (
    caller BLOB    PRIMARY KEY CHECK (length(caller) = 16),
    tat_us INTEGER NOT NULL
);
CREATE INDEX rate_limits_by_tat ON rate_limits (tat_us);
