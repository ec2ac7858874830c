-- A posting still belongs to a journal entry, but the database checks it once per statement instead of once per
-- row. The foreign key postings.entry_index -> journal.index ran one referential check per posting (a query and a
-- FOR KEY SHARE row lock that rewrites the journal row's header, so its page again): measured here, COPY of a
-- journal batch's 4,000 postings took 47-67 ms with it, 14-23 ms without it, 18-30 ms with the checks below.
--
-- Inserted or updated postings: when the journal holds every index between the statement's lowest and highest
-- entry_index (a batch's entries are contiguous, so one range count answers), every posting has its entry; else
-- each one is looked up. Deleting or renumbering a journal entry that has postings, or truncating the journal while
-- postings exist, is refused, as the foreign key refused it (the ledger never does either: the journal is append
-- only). The functions keep the ledger's search path, so a session with another one (an operator's psql) is checked
-- against the ledger's tables too.

ALTER TABLE postings DROP CONSTRAINT postings_entry_index_fkey;

CREATE FUNCTION postings_have_entries() RETURNS trigger LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    lo bigint;
    hi bigint;
BEGIN
    SELECT min(n.entry_index), max(n.entry_index) INTO lo, hi FROM new_postings n;
    IF lo IS NULL OR (SELECT count(*) FROM journal j WHERE j.index BETWEEN lo AND hi) = hi - lo + 1 THEN
        RETURN NULL;
    END IF;
    IF EXISTS (SELECT 1 FROM new_postings n WHERE NOT EXISTS (SELECT 1 FROM journal j WHERE j.index = n.entry_index))
    THEN
        RAISE EXCEPTION 'a posting refers to no journal entry' USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER postings_have_entries_insert AFTER INSERT ON postings
    REFERENCING NEW TABLE AS new_postings FOR EACH STATEMENT EXECUTE FUNCTION postings_have_entries();
CREATE TRIGGER postings_have_entries_update AFTER UPDATE ON postings
    REFERENCING NEW TABLE AS new_postings FOR EACH STATEMENT EXECUTE FUNCTION postings_have_entries();

CREATE FUNCTION journal_keeps_posted_entries() RETURNS trigger LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        IF EXISTS (SELECT 1 FROM postings) THEN
            RAISE EXCEPTION 'the journal cannot be truncated while postings refer to it'
                USING ERRCODE = 'foreign_key_violation';
        END IF;
        RETURN NULL;
    END IF;
    IF EXISTS (SELECT 1 FROM old_journal o
               WHERE NOT EXISTS (SELECT 1 FROM journal j WHERE j.index = o.index)
                 AND EXISTS (SELECT 1 FROM postings p WHERE p.entry_index = o.index)) THEN
        RAISE EXCEPTION 'a journal entry that has postings cannot be deleted or renumbered'
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER journal_keeps_posted_entries_delete AFTER DELETE ON journal
    REFERENCING OLD TABLE AS old_journal FOR EACH STATEMENT EXECUTE FUNCTION journal_keeps_posted_entries();
CREATE TRIGGER journal_keeps_posted_entries_update AFTER UPDATE ON journal
    REFERENCING OLD TABLE AS old_journal FOR EACH STATEMENT EXECUTE FUNCTION journal_keeps_posted_entries();
CREATE TRIGGER journal_keeps_posted_entries_truncate BEFORE TRUNCATE ON journal
    FOR EACH STATEMENT EXECUTE FUNCTION journal_keeps_posted_entries();
