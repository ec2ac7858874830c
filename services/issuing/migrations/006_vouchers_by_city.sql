-- GET /v1/vouchers?city=&beneficiary=&cursor=: a city's vouchers in (created_at, voucher_id) order, the keyset its
-- cursors hold, by city alone or by city and beneficiary; year and status filter the rows these indexes yield.
CREATE INDEX vouchers_city_created ON vouchers (city, created_at, voucher_id);
CREATE INDEX vouchers_city_beneficiary_created ON vouchers (city, beneficiary, created_at, voucher_id);
