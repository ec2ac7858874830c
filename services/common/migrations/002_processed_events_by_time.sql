-- processed_events are pruned by age (services/common/processed_events.py). Rows arrive in applied_at order, so a
-- BRIN index finds the old ones at almost no cost to each claim's insert (a B-tree would add one per event).
CREATE INDEX IF NOT EXISTS processed_events_applied_at ON processed_events USING brin (applied_at);
