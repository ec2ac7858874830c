-- A redemption's (hold's, refund's, subsidised invoice's) voucher is checked once per statement instead of once per
-- row, as issuing migration 008 does for budgets.
--
-- The foreign keys to vouchers fired one referential-integrity query per inserted row (46,402 of them for as many
-- redemptions in one bench phase, pg_stat_statements). Now:
-- - a statement trigger on each of the four tables refuses, with the foreign key's error code, any inserted row whose
--   voucher does not exist (one anti-join over the statement's distinct vouchers);
-- - a subsidised invoice may move to another voucher (a claim taken over by a later spend in the same redemption batch:
--   REASSIGN_INVOICES_SQL), and an update of that table is checked as an insert is;
-- - no row of the other three changes its voucher, and a voucher row is never deleted (no command does either):
--   triggers refuse both, which is what kept the references true from the other side and after an insert.
ALTER TABLE redemptions DROP CONSTRAINT redemptions_voucher_id_fkey;
ALTER TABLE holds DROP CONSTRAINT holds_voucher_id_fkey;
ALTER TABLE refunds DROP CONSTRAINT refunds_voucher_id_fkey;
ALTER TABLE subsidised_invoices DROP CONSTRAINT subsidised_invoices_voucher_id_fkey;

CREATE FUNCTION rows_have_vouchers() RETURNS trigger LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM (SELECT DISTINCT n.voucher_id FROM new_rows n) k
               WHERE NOT EXISTS (SELECT 1 FROM vouchers v WHERE v.voucher_id = k.voucher_id)) THEN
        RAISE EXCEPTION 'a row of % refers to no voucher', TG_TABLE_NAME USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION voucher_ids_stay() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.voucher_id = OLD.voucher_id THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION '% rows never change their voucher, and vouchers are never deleted', TG_TABLE_NAME
        USING ERRCODE = 'foreign_key_violation';
END $$;

CREATE TRIGGER redemptions_have_vouchers AFTER INSERT ON redemptions
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION rows_have_vouchers();
CREATE TRIGGER holds_have_vouchers AFTER INSERT ON holds
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION rows_have_vouchers();
CREATE TRIGGER refunds_have_vouchers AFTER INSERT ON refunds
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION rows_have_vouchers();
CREATE TRIGGER subsidised_invoices_have_vouchers AFTER INSERT ON subsidised_invoices
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION rows_have_vouchers();

CREATE TRIGGER redemptions_keep_vouchers BEFORE UPDATE OF voucher_id ON redemptions
    FOR EACH ROW EXECUTE FUNCTION voucher_ids_stay();
CREATE TRIGGER holds_keep_vouchers BEFORE UPDATE OF voucher_id ON holds
    FOR EACH ROW EXECUTE FUNCTION voucher_ids_stay();
CREATE TRIGGER refunds_keep_vouchers BEFORE UPDATE OF voucher_id ON refunds
    FOR EACH ROW EXECUTE FUNCTION voucher_ids_stay();
-- (A trigger with a transition table cannot name columns: every update of the table is checked, its rows' distinct
-- vouchers once.)
CREATE TRIGGER subsidised_invoices_moved_to_vouchers AFTER UPDATE ON subsidised_invoices
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION rows_have_vouchers();
CREATE TRIGGER vouchers_stay_rekey BEFORE UPDATE OF voucher_id ON vouchers
    FOR EACH ROW EXECUTE FUNCTION voucher_ids_stay();
CREATE TRIGGER vouchers_stay_delete BEFORE DELETE ON vouchers FOR EACH ROW EXECUTE FUNCTION voucher_ids_stay();
CREATE TRIGGER vouchers_stay_truncate BEFORE TRUNCATE ON vouchers FOR EACH STATEMENT EXECUTE FUNCTION voucher_ids_stay();
