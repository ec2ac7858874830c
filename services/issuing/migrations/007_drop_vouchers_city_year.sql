-- No query reads vouchers by (city, year) alone: a program's vouchers are found through (city, program, year), a
-- city's list through (city, created_at, voucher_id). Each index costs every minted voucher an index insertion
-- (~1.5 us of PostgreSQL CPU, measured here), so the unused one goes.
DROP INDEX IF EXISTS vouchers_city_year;
